"""Server hardening (issue 24), the scheduler's side: no single client can starve or stall the others.
Each test is one attack of the security review, run against a real uvicorn server on 127.0.0.1 with a tiny
random model; clients speak from different loopback addresses (127.0.0.2, 127.0.0.3, ...), as different
machines would, since the server tells clients apart by address.

Measured on the code before the fix and after (a loaded 2-core machine), with the bounds asserted here:
* one client holding 16 requests x 16 generations (256, the whole queue): another client's one-line chat
  came back after 23.7 s (queued behind the hog) before; after, 0.02 s (a slot taken back from the hog),
  and 8 of the hog's 16 requests got 429 with Retry-After (its share is 128 generations); bound 5 s;
* 12 echo-scoring floods of 16 prompts x 999 ids on a 16k-vocabulary model: RSS +468-483 MB, /health at
  worst 2,240 ms (and a second poll 403 ms), no 429 before; after +53-82 MB, /health 30-230 ms at worst and
  under 75 ms but for one poll, 4 of 12 floods refused (429); bounds 150 MB, and 200 ms for all polls
  but one (500 ms for that one: a garbage-collection pause or the OS may take it);
* a scoring request whose client hangs up after 0.3 s: 28 prompts scored after the hang-up before, 0 after;
* a request past its budget: queued (or 429) before; 400 request_too_large naming the field after.
"""
import gc
import http.client
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import make_run, post

# ---------------------------------------------------------------- clients at their own addresses

def request_bytes(path: str, body, host: str = "127.0.0.1", headers=()) -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n")
    return head.encode() + data


def open_request(url: str, path: str, body, source: str) -> socket.socket:
    """Send a POST from ``source`` and leave the answer unread (the caller holds the connection)."""
    port = int(url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    s.sendall(request_bytes(path, body))
    return s


def read_head(s: socket.socket, timeout: float):
    """(status, lower-cased headers) of the answer on ``s``, or None if none began within ``timeout``."""
    s.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionError):
        pass
    if not data:
        return None
    lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}


def post_from(url: str, path: str, body, source: str, timeout: float = 60, parse: bool = True):
    """-> (status, parsed JSON, or the bytes unless ``parse``) of a POST sent from the address ``source``."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout, source_address=(source, 0))
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        payload = r.read()
        return r.status, (json.loads(payload) if payload and parse else payload)
    finally:
        conn.close()


def health_latency(url: str, source: str = "127.0.0.9") -> float:
    t = time.perf_counter()
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    return time.perf_counter() - t


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler:
    """In a thread while the block runs: this process's peak RSS and the slowest /health answer."""

    def __init__(self, url: str):
        self.url, self.stop = url, threading.Event()
        self.rss, self.health = [], []

    def __enter__(self):
        self.base = rss_mb()
        self.threads = [threading.Thread(target=self._rss, daemon=True), threading.Thread(target=self._health,
                                                                                          daemon=True)]
        for t in self.threads:
            t.start()
        return self

    def _rss(self):
        while not self.stop.is_set():
            self.rss.append(rss_mb())
            time.sleep(0.01)

    def _health(self):
        while not self.stop.is_set():
            self.health.append(health_latency(self.url))
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        self.growth = max(self.rss, default=self.base) - self.base
        self.slowest = max(self.health, default=0.0)
        print("\n/health slowest", [round(x * 1000) for x in sorted(self.health)[-6:]], "ms of", len(self.health))


def held(url: str) -> int:
    h = post(url, "/health", None)[1]
    return h["waiting"] + h["active"]


CHAT = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}


# ---------------------------------------------------------------- 2. one request, the whole queue

def test_one_client_cannot_fill_the_queue_nor_starve_another(tmp_path, serve_run):
    """The review's probe: one client's requests of 16 generations each (8 prompts x n=2, long answers at
    temperature 2), 256 in all, exactly the queue. Before: all queued, and another client's one-line
    chat got 429. After: the hog holds at most its share (128), its other requests get 429 with
    Retry-After, and the other client's chat is admitted at once (a slot is taken back from the hog)."""
    url, svc, _ = serve_run(make_run(tmp_path / "fair", block=1024), slots=4)
    # greedy from "hello", this model runs past 250 tokens without a stop id: each generation lasts
    ids = svc.tok.encode("hello")
    big = {"prompt": [ids] * 8, "n": 2, "max_tokens": 250, "temperature": 0}
    hog = []
    try:
        hog = [open_request(url, "/v1/completions", big, "127.0.0.2") for _ in range(16)]
        deadline = time.time() + 20
        while held(url) < 100 and time.time() < deadline:  # the hog's requests are in (128 after, 256 before)
            time.sleep(0.05)
        time.sleep(0.5)
        answered = [h for h in (read_head(s, 0.05) for s in hog) if h is not None]
        t0 = time.perf_counter()
        status, answer = post_from(url, "/v1/chat/completions", CHAT, "127.0.0.3", timeout=30)
        took = time.perf_counter() - t0
        print(f"\nthe hog's answers so far: {sorted(st for st, _ in answered)}; the other client: HTTP {status} "
              f"in {took:.2f} s")
        assert status == 200 and took < 5.0, f"the other client's chat: HTTP {status} after {took:.2f} s: {answer}"
        refused = [h for st, h in answered if st == 429]
        assert len(refused) >= 8 and all(int(h["retry-after"]) >= 1 for h in refused), answered
        assert svc.scheduler.preempted >= 1
    finally:
        for s in hog:
            s.close()


# ---------------------------------------------------------------- 1. prompt scoring

def scoring_ids(svc, n: int = 999) -> list[int]:
    return [5 + (7 * i) % (svc.tok.vocab_size - 10) for i in range(n)]


def test_scoring_floods_wait_their_turn_in_bounded_memory(tmp_path, serve_run):
    """12 clients' worth of echo-scoring (16 prompts x 999 ids each, max_tokens 0) on a model with a 16k
    vocabulary, from one address. Before: each ran in its own thread outside the queue, a full forward's
    logits (999 x 16384 floats, 65 MB) per prompt, several at once. After: they queue like generation
    (past the client's share: 429) and the scheduler scores one prompt at a time, 256 positions of logits
    at a time. Meanwhile another client's chat completes and /health answers quickly."""
    url, svc, _ = serve_run(make_run(tmp_path / "score", vocab=16384, block=1024), slots=2)
    flood = {"prompt": [scoring_ids(svc)] * 16, "max_tokens": 0, "echo": True, "logprobs": 0}
    # the whole test suite's objects live in this process, which a server's does not carry: out of the
    # garbage collector's way, so a full collection of them is not what /health waits on (a 611 ms poll once)
    gc.collect()
    gc.freeze()
    got = []
    # (the answers are read, not parsed: this process is the server too, and its GIL is the one measured)
    threads = [threading.Thread(target=lambda: got.append(post_from(url, "/v1/completions", flood, "127.0.0.2",
                                                                    timeout=120, parse=False)[0]))
               for _ in range(12)]
    with Sampler(url) as sample:
        for t in threads:
            t.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        status, answer = post_from(url, "/v1/chat/completions", CHAT, "127.0.0.3")
        chat_s = time.perf_counter() - t0
        for t in threads:
            t.join(timeout=120)
    gc.unfreeze()
    print(f"\nscoring flood: RSS +{sample.growth:.0f} MB, slowest /health {sample.slowest * 1000:.0f} ms, chat "
          f"{chat_s:.2f} s, statuses {sorted(got)}")
    assert status == 200 and chat_s < 10, (status, chat_s, answer)
    assert sample.growth < 150, f"RSS grew {sample.growth:.0f} MB while scoring"
    # every poll but one under 200 ms, none over 500 (one may meet a garbage-collection pause or the OS)
    slow = sorted(sample.health)[-2:]
    assert slow[0] < 0.2 and slow[-1] < 0.5, f"/health took {[round(x * 1000) for x in slow]} ms at worst"
    assert 200 in got and 429 in got  # served within the client's share of the queue, the rest refused
    assert held(url) == 0


def test_scoring_stops_when_its_client_hangs_up(tmp_path, serve_run):
    """A request scoring 32 prompts whose client hangs up after 0.3 s. Before: every prompt was still scored
    (in a thread nobody watched). After: the queued ones leave the queue, the running one stops at its next
    chunk: at most 2 forwards after the hang-up."""
    url, svc, _ = serve_run(make_run(tmp_path / "gone", vocab=16384, block=1024), slots=2)
    model, forwards = svc.model, []
    real = model.hidden_states

    def counting(*a, **k):
        forwards.append(time.perf_counter())
        return real(*a, **k)

    model.hidden_states = counting
    try:
        s = open_request(url, "/v1/completions", {"prompt": [scoring_ids(svc)] * 32, "max_tokens": 0, "echo": True,
                                                  "logprobs": 0}, "127.0.0.2")
        time.sleep(0.3)
        s.close()
        gone = time.perf_counter()
        time.sleep(3.0)
        after = sum(t > gone + 0.05 for t in forwards)
    finally:
        del model.hidden_states
    print(f"\nforwards before the hang-up {len(forwards) - after}, after {after}")
    assert after <= 2, f"{after} prompts were scored after the client hung up"
    assert held(url) == 0


# ---------------------------------------------------------------- 2. the per-request budget

def test_a_request_past_its_budget_is_refused_and_a_default_one_is_shortened(tmp_path, serve_run):
    """2 slots x 128 positions: one request may ask for 256 completion tokens and 64 generations."""
    url, svc, _ = serve_run(make_run(tmp_path / "budget"), slots=2)
    msgs = [{"role": "user", "content": "hi"}]
    status, err = post(url, "/v1/completions", {"prompt": ["a"] * 64, "n": 8, "max_tokens": 1})
    assert status == 400 and err["error"]["code"] == "request_too_large" and err["error"]["param"] == "n", err
    status, err = post(url, "/v1/chat/completions", {"messages": msgs, "n": 4, "max_tokens": 100})
    assert status == 400 and err["error"]["code"] == "request_too_large", err
    assert err["error"]["param"] == "max_tokens" and "400" in err["error"]["message"]
    status, r = post(url, "/v1/chat/completions", {"messages": msgs, "n": 8, "temperature": 0})
    assert status == 200 and all(len(c["message"]["content"]) >= 0 for c in r["choices"])
    assert r["usage"]["completion_tokens"] <= 256  # the default (the room left, 8 times over) shortened
    assert held(url) == 0


def test_the_scheduler_shares_slots_between_clients_and_resumes_what_it_preempted():
    """Unit level: a preempted row resumes where it was (greedy: the same tokens as never preempted)."""
    import torch

    from chatfactory.inference.batching import QueueFull, Request, Scheduler
    from chatfactory.inference.sampling import SamplingParams
    from chatfactory.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=1, n_embd=64, head_dim=32, vocab_size=97, block_size=64))
    p = SamplingParams(max_tokens=20, temperature=0)
    alone = Scheduler(model, slots=2, start=False)
    want = []
    alone.submit(Request([1, 2, 3], p, lambda st: want.append(st.token) if st.token is not None else None))
    alone.run_until_idle()
    sched = Scheduler(model, slots=2, start=False, max_waiting=8, max_client_waiting=4)
    outs = {}

    def req(prompt, client, key):
        outs[key] = []
        return Request(prompt, p, lambda st: outs[key].append(st.token) if st.token is not None else None,
                       client=client)

    sched.submit_all([req([1, 2, 3], "a", "a0"), req([1, 2, 3], "a", "a1")])
    for _ in range(5):
        sched.step()
    with pytest.raises(QueueFull) as e:  # a's share is 4: 2 running + 3 more is past it
        sched.submit_all([req([4], "a", f"x{i}") for i in range(3)])
    assert e.value.retry_after >= 1 and not sched.waiting
    sched.submit_all([req([9, 9], "b", "b0")])
    sched.step()  # b has no slot and is under its share: a's newest row goes back to the queue
    assert sched.preempted == 1 and {r.client for r in sched.rows if r is not None} == {"a", "b"}
    sched.run_until_idle()
    assert outs["a0"] == want and outs["a1"] == want  # the preempted one resumed exactly


def test_the_tokenizing_pool_refuses_past_its_bound_and_never_an_admitted_answer():
    """WorkerPool: work past ``max_pending`` at once is a 429 (server_busy), but an answer of a request already
    admitted always runs; the default bound sits well above the 32 streaming clients of the soak."""
    import asyncio

    from chatfactory.serve.limits import ServerLimits, WorkerPool
    from chatfactory.serve.protocol import APIError

    assert ServerLimits().max_tokenizing >= 64
    gate = threading.Event()

    async def main():
        pool = WorkerPool(1, 2)
        held = [asyncio.ensure_future(pool.run(gate.wait)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as e:
            await pool.run(gate.wait)
        assert e.value.status == 429 and e.value.code == "server_busy"
        answer = asyncio.ensure_future(pool.run(lambda: "answer", admitted=True))
        gate.set()
        assert await answer == "answer" and all(await asyncio.gather(*held))
        pool.close()

    asyncio.run(main())


def test_a_long_prompt_is_scored_a_chunk_per_iteration_with_the_log_probs_of_one_forward():
    """A prompt of 5 chunks is scored over 5 iterations, a running row decoding a token in each of them (not
    waiting for the whole prompt's forward), and its log-probs equal one full forward's."""
    import torch

    from chatfactory.inference.batching import Request, Scheduler
    from chatfactory.inference.sampling import SamplingParams
    from chatfactory.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=2, n_embd=64, head_dim=32, n_kv_head=1, vocab_size=97, block_size=256)).eval()
    sched = Scheduler(model, slots=2, start=False, score_chunk=16)
    prompt = torch.randint(0, 97, (77,)).tolist()  # 76 positions to score: chunks of 16, 16, 16, 16, 12
    got, tokens = [], []
    gen = Request([1, 2, 3], SamplingParams(max_tokens=40, temperature=0), emit=lambda s: tokens.append(s.token))
    sched.submit(gen)
    sched.step()  # the generating row is running
    sched.submit(Request(prompt, SamplingParams(max_tokens=0), emit=got.append, score=True))
    before, steps = len(tokens), 0
    while not got:
        sched.step()
        steps += 1
    assert steps == 5 and len(tokens) - before == 5  # one decoded token beside each chunk
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt]))[0, :-1].float(), -1)
    want = ref.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    lps, _ = got[0].scored
    assert got[0].finish == "scored" and len(lps) == 76
    assert torch.allclose(torch.tensor(lps), want, atol=1e-4)
    sched.run_until_idle()
    assert sched.active() == 0
