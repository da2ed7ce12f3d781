"""Running the HTTP app: ``serve`` (the ``chatfactory serve`` command, until interrupted) and
``ServerThread`` (a real server on a free port in a background thread, for tests and notebooks).

Both run uvicorn's h11 protocol with two guards against slow clients (``guarded_protocol``): a
connection must deliver a request's headers within ``header_timeout`` seconds of connecting (or of its
last answer), else it gets 408 and is closed (a slowloris client trickling headers holds nothing for
long); and at most ``max_connections`` connections are open, ``max_client_connections`` from one address
(503 and closed past that). The body's own deadline is ``body_timeout`` (guard.read_body)."""

from __future__ import annotations

import socket
import threading
import time

from ..inference.batching import BatchOptions
from .api import create_app
from .guard import check_bind
from .limits import ServerLimits, canonical_ip
from .service import load_service

REFUSED = {408: b"408 Request Timeout", 503: b"503 Service Unavailable"}


def guarded_protocol(limits: ServerLimits):
    """uvicorn's h11 protocol with a header deadline and connection limits (see the module docstring)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._deadline, self._cycle = None, None
            peer = canonical_ip(self.client[0]) if self.client else None
            mine = sum(1 for c in self.connections if c.client and canonical_ip(c.client[0]) == peer)
            if len(self.connections) > limits.max_connections or mine > limits.max_client_connections:
                self._refuse(503, "too many connections")
                return
            self._arm()

        def _arm(self):
            why = f"the request headers did not arrive within {limits.header_timeout:g} s"
            self._deadline = self.loop.call_later(limits.header_timeout, self._refuse, 408, why)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _refuse(self, status: int, why: str):
            self._deadline = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # a request is being answered: its own deadlines hold
            body = f'{{"error": {{"message": "{why}", "type": "invalid_request_error", "param": null, ' \
                   f'"code": "{"request_timeout" if status == 408 else "server_busy"}"}}}}'.encode()
            self.transport.write(b"HTTP/1.1 " + REFUSED[status] + b"\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
                                 + body)
            self.transport.close()

        def data_received(self, data: bytes):
            # between requests (keep-alive), the first byte of the next one starts its header deadline
            if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._cycle:  # a request's headers are in
                self._cycle = self.cycle
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return Guarded


def uvicorn_config(app, limits: ServerLimits, **kw):
    import uvicorn

    return uvicorn.Config(app, http=guarded_protocol(limits), timeout_keep_alive=limits.keep_alive, **kw)


class ServerThread:
    """A real uvicorn server on ``host`` (default 127.0.0.1; ``0.0.0.0`` and ``::`` too) and a free port, in a
    background thread (tests, notebooks). Its URL names 127.0.0.1 for a wildcard host.

        with ServerThread(create_app(svc)) as url:  # "http://127.0.0.1:PORT"
            ..."""

    def __init__(self, app, host: str = "127.0.0.1", limits: ServerLimits | None = None):
        import uvicorn

        limits = limits or ServerLimits()
        six = ":" in host
        self.sock = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if six:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else f"[{host}]" if six else host
        self.url = f"http://{shown}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, limits, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(run_dir, stage=None, host="127.0.0.1", port=8000, api_key=None, slots=16, device="auto",
          allow_origin=(), quantize: str | None = None, max_memory: int | str | None = None,
          insecure_no_key: bool = False, limits: ServerLimits | None = None, watch: float = 1.0,
          options: BatchOptions | None = None) -> None:
    """``chatfactory serve``: load the run and serve it until interrupted (``allow_origin``, ``insecure_no_key``:
    serve/guard.py, checked before the model loads; ``quantize`` / ``max_memory``: how the model loads, as in
    ``load_model``; ``limits``: what one client may cost, serve/limits.py). Without ``stage`` it serves the
    version RUN/versions/serving.json names, if any, and follows that file (``watch``: seconds between looks,
    0 for none; serve/hotswap.py). ``options``: how the scheduler runs (inference/batching.py ``BatchOptions``):
    with ``compile`` every attention window is compiled before the server listens (eager, with a warning that
    says why, where it cannot be)."""
    import uvicorn

    limits = limits or ServerLimits()
    check_bind(host, api_key, insecure_no_key, allow_origin)
    svc = load_service(run_dir, stage, api_key, slots, device, quantize, max_memory, limits, watch, options)
    if insecure_no_key and not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host} without --api-key (--insecure-no-key): anyone who can reach it can "
              "use the model and write the feedback that trains the next one")
    where = next(svc.model.parameters()).device
    sched = svc.scheduler
    step = "compiled decode step" if sched.fast is not None else f"eager decode step: {sched.eager_reason}"
    if sched.prefix is not None:
        step += f", prefix cache {sched.options.prefix_cache_mb:g} MiB"
    print(f"serving {svc.name} at http://{host}:{port}/  (API: http://{host}:{port}/v1, {slots} batch slots, "
          f"{where}, {step})", flush=True)
    if svc.hotswap is not None and watch:
        print(f"following {svc.hotswap.versions.serving_file}: a newly promoted version is served without a restart",
              flush=True)
    uvicorn.Server(uvicorn_config(create_app(svc, allow_origin, host), limits, host=host, port=port,
                                  log_level="warning")).run()
