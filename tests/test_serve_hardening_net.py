"""Server hardening (issue 24), the HTTP side: tokenizing off the event loop, the Host check on every
listener, the API key off loopback, slow clients, and errors that say nothing of the server's insides.
Real uvicorn servers, tiny random models; see test_serve_hardening.py for the clients' helpers.

Measured before the fix and after: /health beside a 500 KB special-token body 1,610 ms -> 24 ms at worst;
a foreign Host on 0.0.0.0 (reached at the LAN address) and on :: 200 -> 403; `serve --host 0.0.0.0` with
no key and `--allow-origin *` with none started -> exit 2 with what to do; 100 connections with headers
that never end, from one address, all still open after 15 s -> none (64 answered 408 at the 10 s header
deadline, 36 refused at once past the 64 one address may hold); nested JSON 500 -> 400; a 500 body that
quoted the exception (a path in it) -> a reference to the server's log."""
import http.client
import json
import logging
import os
import socket
import subprocess
import threading
import time

import pytest
from test_serve_hardening import health_latency, read_head, request_bytes

from chatfactory.inference.batching import BatchOptions, Scheduler
from chatfactory.serve.api import create_app
from chatfactory.serve.guard import check_bind
from chatfactory.serve.limits import ServerLimits
from chatfactory.serve.server import ServerThread
from chatfactory.serve.service import load_service
from conftest import cli_cmd, make_run, post

CHAT = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2}


def raw(port: int, data: bytes, address: str = "127.0.0.1", timeout: float = 10):
    """Send ``data`` to ``address``:``port`` -> (status, headers, body) of the answer."""
    with socket.create_connection((address, port), timeout=timeout) as s:
        s.sendall(data)
        head = read_head(s, timeout)
        assert head is not None, "no answer"
        return head


def get(port: int, path: str, host: str, address: str = "127.0.0.1", extra: str = "") -> int:
    return raw(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode(), address)[0]


# ---------------------------------------------------------------- 3. tokenizing off the event loop

def test_a_huge_special_token_body_does_not_stall_health(tmp_path, serve_run):
    """128 messages holding 500 KB of spelled special tokens. Before: the chat template and the tokenizer ran
    on the event loop (1.0-1.6 s here), and /health waited as long. After: they run in a worker thread (and
    faster: no quadratic mask placement), and /health answers within 100 ms meanwhile. The model's block is
    65,536 tokens so that 500 KB is not refused by the character cap before tokenizing (see below)."""
    url, svc, _ = serve_run(make_run(tmp_path / "big", block=65536), slots=2,
                            scheduler=lambda svc: Scheduler(svc.model, slots=2,
                                                                            options=BatchOptions(context=256)))
    assert svc.max_prompt_chars > 500_000
    bomb = {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "<|end|>" * 557}
                         for i in range(128)]}
    assert 490_000 < sum(len(m["content"]) for m in bomb["messages"]) < 500_000
    base = sorted(health_latency(url) for _ in range(5))[2]
    done, worst = {}, []
    t = threading.Thread(target=lambda: done.update(r=post(url, "/v1/chat/completions", bomb)))
    t.start()
    while t.is_alive():
        worst.append(health_latency(url))
    t.join()
    status, err = done["r"]
    delay = max(worst, default=0.0) - base
    print(f"\n/health: {base * 1000:.1f} ms alone, {max(worst, default=0) * 1000:.0f} ms at worst beside the body "
          f"({len(worst)} polls)")
    assert status == 400 and err["error"]["code"] == "context_length_exceeded", err
    assert delay < 0.1, f"/health was delayed {delay * 1000:.0f} ms"


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(tmp_path, serve_run):
    """The character cap: the context (128) x the longest token (13 bytes) = 1,664 characters."""
    url, svc, _ = serve_run(make_run(tmp_path / "cap"), slots=2)
    assert svc.max_prompt_chars == svc.block_size * max(len(b) for b in svc.tok.token_bytes)
    calls = []
    real = svc.tok.chat_prompt
    svc.tok.chat_prompt = lambda msgs: calls.append(1) or real(msgs)
    try:
        long = {"messages": [{"role": "user", "content": "<|end|>" * 300}]}  # 2,100 characters
        status, err = post(url, "/v1/chat/completions", long)
        assert status == 400 and err["error"]["code"] == "context_length_exceeded" and not calls, err
        assert err["error"]["param"] == "messages" and "2100 characters" in err["error"]["message"]
        status, err = post(url, "/v1/completions", {"prompt": ["ok", "x" * 2000]})
        assert status == 400 and err["error"]["param"] == "prompt" and "prompt[1]" in err["error"]["message"]
        assert post(url, "/v1/chat/completions", CHAT)[0] == 200 and calls
    finally:
        del svc.tok.chat_prompt


# ---------------------------------------------------------------- 4 and 6. whose host, and whose key

def lan_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, only a route chosen
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
def test_a_rebinding_host_is_refused_on_every_listener(tmp_path, bind):
    """A DNS-rebinding page names its own domain as the Host. Before: only a connection that arrived on a
    loopback address was checked, so 0.0.0.0 (reached at its LAN address) answered 200, and on :: a
    connection to 127.0.0.1 arrives as ::ffff:127.0.0.1, not seen as loopback: 200 too. After: 403 on every
    listener; the address a client connected to, and loopback names, still pass."""
    svc = load_service(make_run(tmp_path / "bind"), slots=2, api_key=None)
    try:
        with ServerThread(create_app(svc), host=bind) as url:
            port = int(url.rsplit(":", 1)[1])
            addresses = ["127.0.0.1"] + ([lan_address()] if lan_address() else [])
            for address in addresses:
                assert get(port, "/health", "evil.example", address) == 403, address
                assert get(port, "/health", f"evil.example:{port}", address) == 403, address
                assert raw(port, request_bytes("/v1/chat/completions", CHAT, host="attacker.test"), address)[0] == 403
                assert get(port, "/health", f"{address}:{port}", address) == 200, address  # its own address
                assert get(port, "/health", f"localhost:{port}", address) == 200, address
            assert get(port, "/health", f"[::ffff:127.0.0.1]:{port}") == 200
    finally:
        svc.close()


def test_a_lan_listener_is_simulated_too(tmp_path, serve_run):
    """The same on any machine: the app told that the connection arrived on 192.168.7.7 (as uvicorn says on a
    LAN) refuses a foreign Host and takes its own address and the allowed origins' hosts."""
    def lan(app):
        async def wrapped(scope, receive, send):
            if scope["type"] == "http":
                scope = {**scope, "server": ("192.168.7.7", 8000)}
            return await app(scope, receive, send)
        return wrapped

    url, svc, _ = serve_run(make_run(tmp_path / "lan"), slots=2, wrap=lan, allow_origins=["https://chat.example.com"])
    port = int(url.rsplit(":", 1)[1])
    assert get(port, "/health", "rebind.example:8000") == 403
    assert get(port, "/health", "192.168.7.7:8000") == 200 and get(port, "/health", "chat.example.com") == 200


def test_binding_off_loopback_needs_a_key_and_star_needs_one_always(tmp_path):
    """Before: `serve --host 0.0.0.0` without a key started (with a warning), and --allow-origin * too.
    After: both refuse, before loading the model, saying what to do; --insecure-no-key opens the first."""
    with pytest.raises(ValueError, match="--insecure-no-key"):
        check_bind("0.0.0.0", None)
    with pytest.raises(ValueError, match="needs --api-key"):
        check_bind("127.0.0.1", None, allow_origins=["*"])
    check_bind("0.0.0.0", "k")
    check_bind("::", None, insecure_no_key=True)
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("::1", None)
    svc = load_service(make_run(tmp_path / "star"), slots=1)
    try:
        with pytest.raises(ValueError, match="needs --api-key"):
            create_app(svc, ["*"])
    finally:
        svc.close()
    run = make_run(tmp_path / "cli")
    for args, says in ((["--host", "0.0.0.0"], "--insecure-no-key"), (["--allow-origin", "*"], "needs --api-key")):
        p = subprocess.run(cli_cmd("serve", "--run", run, "--port", "0", *args), capture_output=True, text=True,
                           timeout=60, env={**os.environ, "CHATFACTORY_API_KEY": ""})
        assert p.returncode == 2 and says in p.stderr, (p.returncode, p.stdout, p.stderr)


# ---------------------------------------------------------------- 8. slow clients

def test_slow_clients_are_cut_off_and_connections_are_limited(tmp_path):
    """Before: a client that sent half a request line's headers, or a body byte by byte, held its connection
    for as long as it liked, and any number of connections were accepted. After: 408 at the header
    deadline (1 s here) and at the body deadline (1 s), 503 past the connections one address may hold (4
    here), while /health answers from another address."""
    limits = ServerLimits(header_timeout=1.0, body_timeout=1.0, max_client_connections=4, max_connections=50)
    svc = load_service(make_run(tmp_path / "slow"), slots=2, server_limits=limits)
    try:
        with ServerThread(create_app(svc), limits=limits) as url:
            port = int(url.rsplit(":", 1)[1])
            held = []
            for _ in range(3):  # headers that never end
                s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                held.append(s)
            body = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
            body.sendall(request_bytes("/v1/chat/completions", CHAT)[:-10])  # all but the body's last 10 bytes
            extra = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
            t0 = time.perf_counter()
            assert read_head(extra, 5)[0] == 503  # the 5th from one address
            assert health_latency(url, "127.0.0.3") < 0.5  # another address is served meanwhile
            for s in held:
                status, _ = read_head(s, 5)
                assert status == 408 and s.recv(1 << 16) is not None
            assert read_head(body, 5)[0] == 408
            assert time.perf_counter() - t0 < 4
            for s in held + [body, extra]:
                s.close()
            assert get(port, "/health", "127.0.0.1", "127.0.0.1") == 200
    finally:
        svc.close()


# ---------------------------------------------------------------- 9. errors without insides

def test_deeply_nested_json_is_a_400(tmp_path, serve_run):
    """Before: json.loads raised RecursionError, and the client got a 500."""
    url, _, _ = serve_run(make_run(tmp_path / "deep"), slots=1)
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, err = post(url, "/v1/chat/completions", None, raw=deep)
    assert status == 400 and err["error"]["code"] == "invalid_json" and "nested" in err["error"]["message"], err


def test_a_500_names_no_internals_and_the_log_has_them(tmp_path, serve_run, caplog):
    """Before: `internal error: RuntimeError: <the exception's text, paths included>`. After: a reference the
    server's log carries, with the traceback."""
    class Broken(Scheduler):
        def submit(self, req):
            raise RuntimeError("/home/someone/secret/path.py: boom")

    url, _, _ = serve_run(make_run(tmp_path / "crash"), scheduler=lambda svc: Broken(svc.model, slots=1, start=False))
    with caplog.at_level(logging.ERROR, logger="chatfactory.serve"):
        status, err = post(url, "/v1/chat/completions", CHAT)
    msg = err["error"]["message"]
    assert status == 500 and "secret" not in msg and "boom" not in msg and "RuntimeError" not in msg, err
    ref = msg.split("reference ")[1].split(";")[0]
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)


def test_the_web_ui_keeps_the_api_key_for_the_tab_only():
    """Before: the key sat in localStorage, in plain text, for good. After: sessionStorage (this tab, until it
    closes), and what an older page left in localStorage is removed."""
    from chatfactory.serve.openapi import STATIC

    js = (STATIC / "app.js").read_text()
    assert 'sessionStorage.setItem("chatfactory.apikey"' in js and 'localStorage.removeItem("chatfactory.apikey")' in js
    assert '["system", "temperature", "apikey"]' not in js  # the loop that kept every setting in localStorage


# ---------------------------------------------------------------- headers, fuzzed, with a key

def test_fuzzed_headers_with_an_api_key_get_no_5xx(tmp_path, serve_run):
    """Headers as an attacker sends them (Host, Origin, Content-Type, Authorization, Content-Length,
    Transfer-Encoding: odd, broken, huge, repeated) against a keyed server: never a 5xx, never a hang."""
    import random

    url, _, _ = serve_run(make_run(tmp_path / "fuzz"), slots=2, api_key="k3y")
    port = int(url.rsplit(":", 1)[1])
    rng = random.Random(0)
    values = {
        "Host": ["127.0.0.1", "", "[::1", "a" * 5000, "127.0.0.1:99999", "evil.example", "[::ffff:127.0.0.1]",
                 "localhost:0", "%00", "127.0.0.1, evil.example"],
        "Origin": ["null", "http://127.0.0.1", "http://[::1", "javascript:alert(1)", "x" * 3000, "http://:80"],
        "Content-Type": ["application/json", "text/plain", "application/json; charset=utf-8", "", "a" * 2000],
        "Authorization": ["Bearer k3y", "Bearer wrong", "Basic azN5", "Bearer", "Bearer " + "k" * 4000, "\u00e9"],
        "Content-Length": ["0", "-1", "abc", "99999999999999999999", "5"],
        "Transfer-Encoding": ["chunked", "gzip", "identity"],
    }
    statuses = []
    for _ in range(120):
        headers = {k: rng.choice(v) for k, v in values.items() if rng.random() < 0.7}
        path = rng.choice(["/v1/chat/completions", "/v1/feedback", "/tokenize", "/health", "/v1/models"])
        body = json.dumps(CHAT).encode() if rng.random() < 0.7 else b"{" * rng.randint(1, 50)
        head = f"{rng.choice(['POST', 'GET', 'PUT'])} {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(head.encode("utf-8", "surrogateescape") + body)
                s.shutdown(socket.SHUT_WR)
                answer = read_head(s, 10)
        except OSError as e:
            answer = (0, {"error": str(e)})
        statuses.append(answer[0] if answer else None)  # None: closed without an answer (h11 refused it)
    print(f"\nheader fuzz: {sorted((str(k), statuses.count(k)) for k in set(statuses))}")
    assert not [s for s in statuses if s is not None and s >= 500] and 0 not in statuses
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
