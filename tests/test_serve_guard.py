"""The server's guards (serve/guard.py and the scheduler's queue): foreign pages cannot write, a huge
streamed body is refused while it streams, a client that leaves frees its place in the queue, and the
feedback store closes its SQLite connections. Real uvicorn servers on 127.0.0.1, tiny random models."""
import http.client
import json
import socket
import sqlite3
import time

import pytest
import torch

from chatfactory.inference.batching import QueueFull, Request, Scheduler
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.serve import feedback as feedback_mod
from chatfactory.serve.api import create_app
from conftest import make_run, post

openai = pytest.importorskip("openai")
CONV = [{"role": "user", "content": "Say hi"}]
RATING = {"kind": "rating", "messages": CONV, "answer": "Hi!", "rating": 1}


def raw(url, method, path, body=b"", headers=()):
    """-> (status, parsed JSON body, response headers) with exactly the headers given (plus Host,
    unless given): what a browser or a hostile page would send, not what a helper adds."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, body=body, headers=dict(headers))
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    is_json = r.headers.get("content-type", "").startswith("application/json")
    return r.status, (json.loads(payload) if payload and is_json else None), r.headers


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve_run):
    url, svc, _ = serve_run(make_run(tmp_path_factory.mktemp("guard") / "g"), slots=2,
                            allow_origins=["http://localhost:3000, https://chat.example.com"])
    return svc, url


def count(svc) -> int:
    return len(svc.feedback.rows())


def test_cross_site_writes_are_refused_and_the_ui_and_sdk_pass(served):
    svc, url = served
    before = count(svc)
    port = url.rsplit(":", 1)[1]
    body = json.dumps(RATING).encode()
    # a form or fetch() from any page may POST text/plain with no CORS preflight
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        status, err, _ = raw(url, "POST", "/v1/feedback", body, {"Content-Type": ctype} if ctype else {})
        assert status == 415 and err["error"]["code"] == "unsupported_media_type", err
        assert err["error"]["type"] == "invalid_request_error" and "application/json" in err["error"]["message"]
    # JSON from a foreign page's origin (after a preflight nobody granted), and a DNS-rebinding page
    # (its own domain, resolved to 127.0.0.1, as the Host: same-origin to the browser)
    status, err, _ = raw(url, "POST", "/v1/feedback", body, {"Content-Type": "application/json", "Origin": "https://evil.example"})
    assert status == 403 and err["error"]["code"] == "forbidden_origin"
    status, err, _ = raw(url, "POST", "/v1/feedback", body, {"Content-Type": "application/json", "Origin": "null"})
    assert status == 403 and err["error"]["code"] == "forbidden_origin"
    evil = f"evil.example:{port}"
    status, err, _ = raw(url, "POST", "/v1/feedback", body, {"Content-Type": "application/json", "Host": evil,
                                                               "Origin": f"http://{evil}"})
    assert status == 403 and err["error"]["code"] == "forbidden_host"
    assert raw(url, "GET", "/v1/models", headers={"Host": evil})[0] == 403  # rebinding reads nothing either
    assert count(svc) == before  # nothing of that landed
    # the web UI: same origin, JSON (static/app.js), under each loopback name
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        status, r, _ = raw(url, "POST", "/v1/feedback", body, {"Content-Type": "application/json; charset=utf-8",
                                                                 "Host": host, "Origin": f"http://{host}"})
        assert status == 200 and r["object"] == "feedback"
    # a front end let in with --allow-origin (comma-separated), and its CORS preflight
    status, r, _ = raw(url, "POST", "/v1/feedback", body, {"Content-Type": "application/json", "Origin": "http://localhost:3000"})
    assert status == 200
    status, _, h = raw(url, "OPTIONS", "/v1/feedback", headers={"Origin": "https://chat.example.com",
                                                                "Access-Control-Request-Method": "POST",
                                                                "Access-Control-Request-Headers": "content-type"})
    assert status == 200 and h["access-control-allow-origin"] == "https://chat.example.com"
    assert raw(url, "GET", "/health", headers={"Host": "chat.example.com"})[0] == 200  # its reverse proxy's Host
    assert count(svc) == before + 3
    # the openai SDK: application/json, no Origin
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    assert client.chat.completions.create(model=svc.name, messages=CONV, max_tokens=2).choices


def test_a_foreign_origin_needs_allow_origin(tmp_path, serve_run):
    url, svc, _ = serve_run(make_run(tmp_path / "plain"), slots=1)  # no allow-list: localhost:3000 is foreign too
    status, err, _ = raw(url, "POST", "/v1/feedback", json.dumps(RATING).encode(),
                         {"Content-Type": "application/json", "Origin": "http://localhost:3000"})
    assert status == 403 and "--allow-origin" in err["error"]["message"]
    assert post(url, "/v1/feedback", RATING)[0] == 200
    with pytest.raises(ValueError, match="allow-origin"):
        create_app(svc, ["not a url"])


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(served):
    """No Content-Length to check up front: the server must count as it reads and answer 413 before
    the body ends (this client never ends it: a server that reads it whole would wait forever)."""
    svc, url = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b'{"messages": "' + b"a" * 65_536
        sent = 0
        while sent <= svc.limits.max_body_bytes:  # just past the limit, and no terminating 0-chunk
            s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
        got = b""
        while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
            part = s.recv(65536)
            if not part:
                break
            got += part
    head, _, payload = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(payload[payload.index(b"{"):])["error"]["code"] == "body_too_large"
    assert post(url, "/health", None)[0] == 200


def test_cancel_takes_a_waiting_request_out_of_the_queue():
    """A cancelled request that never got a slot leaves the queue at once: it must not make others 429."""
    torch.manual_seed(0)
    sched = Scheduler(GPT(GPTConfig(depth=1, n_embd=64, head_dim=32, vocab_size=97, block_size=64)),
                      slots=1, max_waiting=1, start=False)  # nothing drains it
    got = []
    a = sched.submit(Request([1, 2], SamplingParams(max_tokens=3), got.append))
    with pytest.raises(QueueFull):
        sched.submit(Request([3], SamplingParams(max_tokens=3), got.append))
    a.cancel()
    assert not sched.waiting and a.finished and got[-1].finish == "cancelled"
    b = sched.submit(Request([3], SamplingParams(max_tokens=3), got.append))  # room again
    sched.run_until_idle()
    assert b.finished and got[-1].finish == "length"
    a.cancel()  # again, or after the end: nothing happens
    assert not sched.waiting


def asgi_spec(app, version):
    """The app as a server speaking ASGI ``version`` sees it: from 2.4 on, Starlette stops listening for
    the client's disconnect during a streamed response and relies on a failing send instead."""
    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": version}}
        await app(scope, receive, send)
    return wrapped


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
def test_a_streaming_client_that_leaves_while_queued_frees_its_place(tmp_path, serve_run, spec):
    """The scheduler never runs here, so the stream sends nothing after its first chunk: the server
    must notice the hang-up by itself, cancel the request and take it out of the waiting queue."""
    url, svc, _ = serve_run(make_run(tmp_path / "q"), wrap=lambda app: asgi_spec(app, spec),
                            scheduler=lambda svc: Scheduler(svc.model, slots=1, max_waiting=1, start=False))
    stuck = svc.scheduler
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({"messages": CONV, "max_tokens": 5, "stream": True}))
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    req = stuck.waiting[0]
    assert post(url, "/v1/chat/completions", {"messages": CONV, "max_tokens": 2})[0] == 429  # full
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 10
    while stuck.waiting and time.time() < deadline:
        time.sleep(0.05)
    assert req.cancelled and req.finished and not stuck.waiting
    assert post(url, "/health", None)[1]["waiting"] == 0
    stuck.submit(Request([1, 2], SamplingParams(max_tokens=1), lambda st: None))  # no QueueFull


def test_feedback_store_closes_its_connections(tmp_path, monkeypatch):
    opened = []

    class Tracked(sqlite3.Connection):
        closed = False

        def close(self):
            self.closed = True
            super().close()

    real = sqlite3.connect
    monkeypatch.setattr(feedback_mod.sqlite3, "connect",
                        lambda *a, **k: opened.append(real(*a, factory=Tracked, **k)) or opened[-1])
    store = feedback_mod.FeedbackStore(tmp_path / "f.sqlite")
    store.add(RATING, "m", "sft")
    with pytest.raises(ValueError):
        store.add({"kind": "vote"})  # refused before a connection is opened
    store.add({**RATING, "answer": "Go away.", "rating": -1})
    assert store.export(tmp_path / "pairs.jsonl") == 1
    assert len(opened) >= 4 and all(db.closed for db in opened)


@pytest.mark.parametrize("allow", [(), ("*",)])
def test_malformed_host_and_origin_headers_are_refused_not_crashed_on(tmp_path, serve_run, allow):
    """A Host or Origin that does not parse (an unclosed IPv6 bracket, a port past 65535) is a 403 from
    the guard (it names no host this server answers to), or, with the checks off (*), just not looked
    at: never a 500 from parsing it."""
    url = serve_run(make_run(tmp_path / "h"), slots=1, api_key="k", allow_origins=allow).url
    port = url.rsplit(":", 1)[1]
    key = {"Authorization": "Bearer k"}
    cases = [{"Host": "["}, {"Host": "[::1"}, {"Host": "localhost:99999", "Origin": "http://localhost:99999"},
             {"Host": "localhost:99999", "Origin": "null"}, {"Host": f"localhost:{port}", "Origin": "http://[::1"}]
    for headers in cases:
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("GET", "/nowhere")):
            status, err, _ = raw(url, method, path, headers={**key, **headers})
            want = {"/health": 200, "/v1/models": 200, "/nowhere": 404}[path] if allow else 403
            assert status == want, (headers, path, status, err)
            if status != 200:
                assert err["error"]["type"] != "server_error", err
    status, r, _ = raw(url, "GET", "/health", headers={"Host": f"localhost:{port}"})
    assert status == 200 and r["status"] == "ok"
