"""Request guards for the server: who may write, in what format, and how much.

Without ``--api-key`` (the default on 127.0.0.1) the only thing between a web page the user happens
to visit and ``POST /v1/feedback`` is the browser. A page may send a "simple" cross-site POST
(``text/plain``, no CORS preflight) and poison the comparisons that train the reward model, and a
DNS-rebinding page may even talk to the server as if it were same-origin. So:

* a POST must say ``Content-Type: application/json`` (415 otherwise): a cross-site page can only send
  that after a CORS preflight, which this server does not grant to foreign origins;
* every request must name this server as its ``Host``: a loopback name (``localhost``, ``127.0.0.1``,
  ``[::1]``), the address the connection arrived on (``192.168.1.5`` on a LAN), the ``--host`` it was
  bound to, or a host of an allowed origin; a DNS-rebinding page sends its own domain. This holds on
  every listener, ``0.0.0.0`` and ``::`` included (an IPv4-mapped ``::ffff:127.0.0.1`` is ``127.0.0.1``);
* an ``Origin`` header (browsers send it on cross-origin requests and on same-origin POSTs) must be
  the server's own (the origin of the request's Host) or an allowed one;
* a body may be at most ``max_body_bytes``, counted while it streams in (a chunked body has no
  Content-Length to check up front), so an oversized upload is refused without being read whole, and
  must arrive within ``body_timeout`` seconds (408);
* a client's hang-up is watched for while its answer is generated (``client_gone``), so a request
  that is still queued, or whose sends have not failed yet, is cancelled at once.

Other front ends (a chat app at another origin, a reverse proxy with its own host name) are let in
with ``--allow-origin URL`` (repeatable or comma-separated). ``*`` turns the origin and host checks off,
so it is refused without an API key (the key is then what keeps foreign pages out). Binding an address
other than loopback needs an API key too, or ``--insecure-no-key`` (``check_bind``): without one, anyone
who can reach the address can use the model and write the feedback that trains the next one.
"""

from __future__ import annotations

import asyncio
import ipaddress
from urllib.parse import urlsplit

from .protocol import APIError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def _ip(addr: str | None):
    """``addr`` as an IP address (an IPv4-mapped IPv6 one as its IPv4 address), or None for a name."""
    try:
        ip = ipaddress.ip_address((addr or "").strip("[]").split("%")[0])
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def check_bind(host: str, api_key: str | None, insecure_no_key: bool = False, allow_origins=()) -> None:
    """Refuse (ValueError, saying what to do) to serve ``host`` off loopback without an API key unless
    ``insecure_no_key``, and ``--allow-origin *`` without one at all."""
    if "*" in parse_allowed(allow_origins) and not api_key:
        raise ValueError("--allow-origin * lets any web page call this server, so it needs --api-key KEY (or "
                         "$CHATFACTORY_API_KEY); or name the front ends: --allow-origin http://host:port")
    if not _is_loopback(host) and host != "localhost" and not api_key and not insecure_no_key:
        raise ValueError(f"serving on {host} without --api-key: anyone who can reach that address could use the "
                         "model and write the feedback that trains the next one. Set --api-key KEY (or "
                         "$CHATFACTORY_API_KEY), or pass --insecure-no-key to open it anyway")


def parse_allowed(values) -> set[str]:
    """``--allow-origin`` values (each maybe comma-separated) -> normalised origins, or {"*"}."""
    out = set()
    for v in [values] if isinstance(values, str) else (values or []):
        for part in str(v).split(","):
            part = part.strip().rstrip("/")
            if not part:
                continue
            try:
                origin = part if part == "*" else _origin(part) if urlsplit(part).hostname else None
            except ValueError:  # an unclosed IPv6 bracket, a port past 65535
                origin = None
            if origin is None:
                raise ValueError(f"--allow-origin {part!r}: expected an origin such as http://localhost:3000, or *")
            out.add(origin)
    return out


def _origin(url: str) -> str:
    u = urlsplit(url)
    default = {"http": 80, "https": 443}.get(u.scheme)
    port = u.port if u.port not in (None, default) else None
    host = f"[{u.hostname}]" if u.hostname and ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}" + (f":{port}" if port else "")


def _is_loopback(addr: str | None) -> bool:
    ip = _ip(addr)
    return ip is not None and ip.is_loopback


def host_is_ours(name: str | None, local: str | None, names: set[str]) -> bool:
    """Whether a Host header's name is this server's: a loopback name or address, one of ``names`` (the
    bound host, allowed origins' hosts), or the address ``local`` the connection arrived on."""
    if not name:
        return False
    if name in names or name == "localhost":
        return True
    ip = _ip(name)
    return ip is not None and (ip.is_loopback or ip == _ip(local) or any(ip == _ip(n) for n in names))


def check_request(request, allowed: set[str], bind_host: str | None = None) -> None:
    """Refuse (APIError 403/415) a request that a foreign page may have sent; see the module docstring."""
    headers = request.headers
    if "*" not in allowed:
        host = headers.get("host", "")
        try:
            host_name = urlsplit(f"//{host}").hostname or ""
        except ValueError:  # an unclosed IPv6 bracket and the like: no name this server answers to
            host_name = None
        names = LOOPBACK_NAMES | {urlsplit(o).hostname for o in allowed} | ({bind_host.lower()} if bind_host else set())
        local = (request.scope.get("server") or (None,))[0]
        if not host_is_ours(host_name, local, names):
            raise APIError(403, f"Host {host!r} is not this server's (a DNS-rebinding page?); "
                                "allow it with --allow-origin", code="forbidden_host")
        origin = headers.get("origin")
        if origin is not None:
            try:  # (not request.url: building it parses the Host header too)
                own = _origin(f"{request.scope.get('scheme', 'http')}://{host}") if host else None
            except ValueError:  # a Host that does not parse (a port past 65535...) is no origin of ours
                own = None
            try:
                theirs = _origin(origin)
            except ValueError:
                theirs = origin
            if theirs != own and theirs not in allowed:
                raise APIError(403, f"cross-origin request from {origin!r} refused; allow that front end "
                                    "with --allow-origin", code="forbidden_origin")
    if request.method == "POST":
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                           code="unsupported_media_type")


def install_guards(app, allow_origins=(), bind_host: str | None = None, api_key: str | None = None) -> None:
    """Check every request (``check_request``) before anything else runs; CORS for allowed front ends.
    ``*`` without ``api_key``: ValueError (``check_bind``)."""
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse

    allowed = parse_allowed(allow_origins)
    check_bind("127.0.0.1", api_key, allow_origins=allowed)

    @app.middleware("http")
    async def _guard(request, call_next):
        try:
            check_request(request, allowed, bind_host)
        except APIError as e:  # raised in a middleware, so the app's exception handlers never see it
            return JSONResponse(e.body(), status_code=e.status)
        return await call_next(request)

    if allowed:  # added last, so outermost: it answers the allowed front ends' CORS preflights itself
        app.add_middleware(CORSMiddleware, allow_origins=sorted(allowed), allow_methods=["*"], allow_headers=["*"])


async def client_gone(request) -> None:
    """Returns once the client has hung up. For after the body is read, when the only message left to
    receive is the disconnect; ``request.is_disconnected()`` cannot stand in for it, as its instant
    (cancelled) receive never gets through Starlette's middleware wrappers."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_body(request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed), and
    with 408 when it has not all arrived within ``timeout`` seconds (a client trickling it in)."""
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        raise APIError(413, f"request body of {size} bytes is over the {limit}-byte limit", code="body_too_large")

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:  # stop reading here: the rest of a huge (chunked) upload never lands in memory
                raise APIError(413, f"request body is over the {limit}-byte limit ({total} bytes "
                                    "arrived before reading stopped)", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None
