"""Fuzz, load and soak a real `chatfactory serve` process (issue 14, "then measure" 1 and 2).

Builds a tiny run in a temp directory (a BPE tokenizer trained here, a random-init GPT whose vocabulary
is padded past the tokenizer's, as an imported model's often is; no download), starts
`python -m chatfactory.cli serve` on 127.0.0.1 and a free port, and then:

1. Fuzzing: schemathesis reads the server's own schema (/openapi.json) and generates requests for
   every operation in it, schema-valid ("positive") and schema-breaking ("negative") ones, until at
   least --fuzz-cases were sent. Each answer is checked: not a 5xx; status code, content type, headers
   and body as the schema documents them. /health must answer afterwards. Whether negative data was
   refused and positive data accepted is counted too (informative: e.g. a schema-valid prompt can still
   be longer than the context, which the schema cannot know). max_tokens is bounded by the tiny
   model's context (--block), so no request generates for long.
2. Soak: --clients concurrent streaming chat completions (SSE) for --soak-minutes. Any non-200, error
   event or stream without `data: [DONE]` is an error. The server's resident memory (VmRSS) is
   sampled every second: rss_growth = RSS at the end / RSS after the warm-up (the first 10% of the
   time, at least 10 s) - 1. Afterwards /health must show no slot, queue place or KV-cache position
   still held. Time to first token (first content delta) p50/p95.
3. Feedback: --fb-threads threads x --fb-posts concurrent POST /v1/feedback; exactly threads x posts
   rows with this run's marker must be in the SQLite file (the server runs with --feedback-rate high
   enough for the burst: its per-client rate limit is tested in tests/test_serve_hardening_feedback.py).
4. Headers (issue 24): at least --header-cases raw requests whose Host, Origin, Content-Type,
   Authorization, Content-Length, Transfer-Encoding, method and body are drawn from odd, broken, huge and
   hostile values; no answer may be a 5xx, nor may a connection fail before the server answered or closed.
5. --api-key mode: a second server started with a key; the schema fuzzing of 1. again (--keyed-cases,
   with the key on every request) and the header fuzzing of 4. (half the requests with the right key):
   0 x 5xx, and a request without the key gets 401.

The last line is the RESULT line, with this host's measured fp32 matmul peak (GFLOP/s) for scale.

    .venv/bin/python bench/fuzz_and_soak.py                       # 1,000+ fuzz cases, 10-minute soak
    .venv/bin/python bench/fuzz_and_soak.py --soak-minutes 1      # a shorter soak
    .venv/bin/python bench/fuzz_and_soak.py --quick               # smoke test (tests/test_benches.py): 20+ cases,
                                                                  # a 5 s soak of 4 clients, 2 x 5 posts

Run the full soak alone: on a 2-core machine the clients share the CPU with the server, and anything
else running is noise in the time-to-first-token figures. Needs `schemathesis` (the dev extras).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import one_stream  # noqa: E402  one streaming chat completion -> {ok, ttft, tokens, error}

TEXT = ["the quick brown fox jumps over the lazy dog. hello world, how are you today? " * 4,
        "def add(x, y):\n    return x + y\n" * 4, "Markdown has **bold**, *italic* and `code`. " * 4,
        "Unicode too: héllo wörld, 世界, emoji 🙂 and tabs\tand newlines\n" * 4]
STREAMING = ("POST /v1/chat/completions", "POST /v1/completions")  # operations that answer with SSE too
PROMPTS = ["Tell me about Python lists.", "What does the with statement do?", "Explain generators, briefly.",
           "How do I read a file?", "What is a decorator?", "Say something about dictionaries."]
# --quick: a few fuzz cases per operation, a 5-second soak (shorter than the warm-up: RSS growth is measured
# from the first sample), a small feedback burst, a few header cases, a few keyed fuzz cases
QUICK = dict(fuzz_cases=20, soak_minutes=0.08, clients=4, fb_threads=2, fb_posts=5, header_cases=40, keyed_cases=20)


# ---------------------------------------------------------------- the server under test

def build_run(root: Path, block: int) -> Path:
    """A run directory: tokenizer.json (trained here) and a random-init tiny GPT as the 'sft' stage."""
    import torch

    from chatfactory.model.gpt import GPT, GPTConfig
    from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
    from chatfactory.text.tokenizer import Tokenizer

    tok = Tokenizer.train(TEXT, vocab_size=400)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    # 16 padding ids past the tokenizer's vocabulary: ids that no text spells must never come out
    cfg = GPTConfig(depth=2, n_embd=64, head_dim=32, vocab_size=tok.vocab_size + 16, block_size=block)
    save_checkpoint(root / "sft", unique_state_dict(GPT(cfg)), {"model": cfg.to_dict()})
    return root


class Server:
    """`chatfactory serve` in a subprocess on 127.0.0.1 (its output goes to a log file, never a pipe
    that could fill up and stall it)."""

    def __init__(self, run: Path, slots: int, api_key: str = ""):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = run / ("server-keyed.log" if api_key else "server.log")
        self.cmd = [sys.executable, "-m", "chatfactory.cli", "serve", "--run", str(run), "--port", str(self.port),
                    "--slots", str(slots), "--device", "cpu", "--feedback-rate", "1000000"]

    def __enter__(self) -> Server:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "CHATFACTORY_API_KEY": self.api_key})
        deadline = time.time() + 120
        while True:
            try:
                self.health()
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not start:\n{self.log_tail()}") from None
                time.sleep(0.3)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def health(self) -> dict:
        return json.load(urllib.request.urlopen(self.url + "/health", timeout=10))

    def rss_mb(self) -> float:
        """The server process's resident memory (VmRSS), MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


# ---------------------------------------------------------------- 1. fuzzing

def fuzz(url: str, cases: int, seed: int, save: str | None = None, api_key: str = "") -> dict:
    """schemathesis over every operation of the server's schema, positive and negative, until at least
    ``cases`` requests were sent -> counts and the first few failures of each kind (``api_key``: sent with
    every request)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings, strategies
    from hypothesis import seed as hypothesis_seed
    from schemathesis import GenerationMode
    from schemathesis.core.failures import FailureGroup  # a BaseExceptionGroup: not an Exception
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        positive_data_acceptance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=auth)  # the schema is behind the key too
    ops = [r.ok() for r in schema.get_all_operations()]
    conformance = [status_code_conformance, content_type_conformance, response_headers_conformance,
                   response_schema_conformance]
    informative = [negative_data_rejection, positive_data_acceptance]
    session = requests.Session()
    if api_key:
        session.headers["Authorization"] = f"Bearer {api_key}"
    st = {"cases": 0, "5xx": 0, "schema_failures": 0, "transport_errors": 0, "by_op": Counter(),
          "status": Counter(), "failures": Counter(), "examples": [], "informative": Counter(), "answered": Counter(),
          "informative_examples": []}

    def record(kind: str, label: str, detail: str):
        st["failures"][kind] += 1
        if sum(1 for e in st["examples"] if e[0] == kind) < 3:
            st["examples"].append((kind, label, detail[:1500]))

    def run_case(case, mode):
        st["cases"] += 1
        st["by_op"][case.operation.label] += 1
        try:
            resp = case.call(session=session, timeout=120)
        except Exception as e:  # the server dropped the connection or stalled: as bad as a 5xx
            st["transport_errors"] += 1
            record("transport", case.operation.label, f"{type(e).__name__}: {e}\n{case.as_curl_command()}")
            return
        st["status"][resp.status_code] += 1
        if resp.status_code < 300:  # what was answered, by content type (SSE streams among them)
            ctype = resp.headers.get("content-type") or [""]  # schemathesis keeps a list per header
            st["answered"][f"{case.operation.label} {ctype[0].split(';')[0]}"] += 1
        if resp.status_code >= 500 and save:
            with open(save, "a") as f:
                f.write(json.dumps({"operation": case.operation.label, "status": resp.status_code, "answer": resp.text,
                                    "curl": case.as_curl_command()}) + "\n")
        if resp.status_code >= 500:
            st["5xx"] += 1
            record("5xx", case.operation.label, f"{resp.status_code} {resp.text[:400]}\n{case.as_curl_command()}")
        bad = False
        for check in conformance:
            try:
                case.validate_response(resp, checks=[check])
            except (Exception, FailureGroup) as e:
                bad = True
                record(check.__name__, case.operation.label, f"{e}")
        st["schema_failures"] += bad
        for check in informative:
            if (check is positive_data_acceptance) != mode.is_positive:
                continue
            try:
                case.validate_response(resp, checks=[check])
            except (Exception, FailureGroup):
                if check is negative_data_rejection and resp.status_code >= 400:
                    continue  # refused, only with a status schemathesis does not expect (413: too large)
                try:
                    code = resp.json()["error"]["code"]
                except Exception:
                    code = "-"
                key = f"{check.__name__}:{case.operation.label}:{resp.status_code}:{code}"
                st["informative"][key] += 1
                if st["informative"][key] == 1:
                    st["informative_examples"].append((key, resp.text[:300]))

    def op_test(op, case_mode, n: int, round_seed: int):
        """The hypothesis test of ``op`` in ``case_mode`` (bound here: @given allows no default arguments)."""

        @hypothesis_seed(round_seed)
        @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=case_mode), stream=strategies.booleans())
        def test(case, stream):
            # schema-valid bodies rarely say stream: true by chance (about 1 in 75): half of them do
            # here, so that the event streams (SSE) are fuzzed and checked as often as JSON answers
            body = case.body
            if (stream and case_mode.is_positive and op.label in STREAMING and isinstance(body, dict)
                    and not body.get("echo") and body.get("logprobs") in (None, False)):  # those: no stream
                body["stream"] = True
            run_case(case, case_mode)
        return test

    # parameterless GETs have one possible request; the rest share the budget, half positive, half negative
    varied = [op for op in ops if len(op.body) or len(op.path_parameters)]
    rounds = 0
    while st["cases"] < cases and rounds < 20:  # hypothesis may stop early (few distinct inputs): go again
        per = max(1, math.ceil((cases - st["cases"]) / max(1, 2 * len(varied))))
        for op in ops:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                test = op_test(op, mode, per if op in varied else 3, seed + rounds)
                try:
                    test()
                except Exception as e:  # e.g. no negative data exists for a parameterless GET
                    if mode is GenerationMode.POSITIVE:
                        record("generation", op.label, f"{type(e).__name__}: {e}")
        rounds += 1
    st["operations"] = [op.label for op in ops]
    return st


# ---------------------------------------------------------------- 4. headers

HEADER_VALUES = {
    "Host": ["127.0.0.1", "", "[::1", "[::1]", "a" * 5000, "127.0.0.1:99999", "evil.example", "[::ffff:127.0.0.1]",
             "localhost:0", "%00", "127.0.0.1, evil.example", "127.0.0.1\t", "xn--80ak6aa92e.com"],
    "Origin": ["null", "http://127.0.0.1", "http://[::1", "javascript:alert(1)", "x" * 3000, "http://:80", "*",
               "http://127.0.0.1:99999", "https://evil.example"],
    "Content-Type": ["application/json", "text/plain", "application/json; charset=utf-8", "", "a" * 2000,
                     "APPLICATION/JSON", "multipart/form-data; boundary=x"],
    "Authorization": ["Bearer {key}", "Bearer wrong", "Basic azN5", "Bearer", "Bearer " + "k" * 4000, "\u00e9",
                      "bearer {key}", "Bearer {key} extra"],
    "Content-Length": ["0", "-1", "abc", "99999999999999999999", "5", "1000001", " 3"],
    "Transfer-Encoding": ["chunked", "gzip", "identity", "chunked, chunked"],
    "Connection": ["close", "keep-alive", "upgrade", "x" * 100],
    "Upgrade": ["websocket", "h2c"],
}
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/feedback", "/tokenize", "/detokenize", "/health",
         "/v1/models", "/tokenizer_info", "/", "/static/app.js", "/static/../serve.py", "/v1/nothing",
         "/v1/arena/battle", "/v1/arena/vote", "/v1/leaderboard", "/v1/admin/reload", "/v1/admin/rollback",
         "/v1/admin/arena"]


def fuzz_headers(port: int, cases: int, seed: int, api_key: str = "") -> dict:
    """``cases`` raw requests over sockets with headers drawn from HEADER_VALUES (each present or not, 30% of
    them twice), random methods, paths and bodies -> status counts, 5xx and failures. A connection the server
    closes without answering (h11 refusing what cannot be parsed) is counted, not a failure."""
    import random

    rng = random.Random(seed)
    st = {"cases": 0, "5xx": 0, "failures": 0, "closed": 0, "status": Counter(), "examples": []}
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    # how often each header is there (Host nearly always; framing headers seldom, or h11 refuses most requests)
    present = {"Host": 0.9, "Content-Length": 0.3, "Transfer-Encoding": 0.1, "Connection": 0.2, "Upgrade": 0.05}
    for _ in range(cases):
        body = rng.choice([chat, chat, b"", b"{" * rng.randint(1, 3000), b"[1]" * 50, os.urandom(rng.randint(1, 200))])
        lines = [f"Content-Length: {len(body)}"]  # the true length, unless replaced below
        for name, values in HEADER_VALUES.items():
            for _ in range(1 + (rng.random() < 0.15)):
                if rng.random() < present.get(name, 0.6):
                    lines.append(f"{name}: {rng.choice(values).replace('{key}', api_key or 'k')}")
        if sum(x.startswith("Content-Length") for x in lines) > 1 and rng.random() < 0.8:
            lines.pop(0)  # mostly one Content-Length, the fuzzed one
        rng.shuffle(lines)
        head = f"{rng.choice(['POST', 'GET', 'PUT', 'OPTIONS', 'HEAD'])} {rng.choice(PATHS)} HTTP/1.1\r\n"
        data = (head + "".join(x + "\r\n" for x in lines) + "\r\n").encode("utf-8", "surrogateescape") + body
        st["cases"] += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                answer = b""
                while b"\r\n" not in answer:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        except OSError as e:
            if isinstance(e, ConnectionResetError):  # refused and closed while the request still arrived
                st["closed"] += 1
                continue
            st["failures"] += 1
            if len(st["examples"]) < 3:
                st["examples"].append(f"{type(e).__name__}: {e} on {data[:300]!r}")
            continue
        if not answer:
            st["closed"] += 1
            continue
        code = int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        st["status"][code] += 1
        if code >= 500 or code == 0:
            st["5xx"] += 1
            if len(st["examples"]) < 3:
                st["examples"].append(f"{answer[:200]!r} on {data[:300]!r}")
    return st


# ---------------------------------------------------------------- 2. load and soak

def soak(server: Server, model: str, minutes: float, clients: int, max_tokens: int) -> dict:
    """``clients`` threads streaming chat completions back to back for ``minutes``; RSS sampled each second."""
    total = minutes * 60
    warm = max(10.0, 0.1 * total)
    t0 = time.perf_counter()
    stop_at = t0 + total
    results, lock = [], threading.Lock()
    rss: list[tuple[float, float]] = []

    def client(c):
        r = 0
        while time.perf_counter() < stop_at:
            began = time.perf_counter() - t0
            res = one_stream(server.port, model, PROMPTS[(c + r) % len(PROMPTS)], max_tokens, seed=100_000 * c + r)
            res["began"] = began
            with lock:
                results.append(res)
            r += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append((time.perf_counter() - t0, server.rss_mb()))
        time.sleep(1.0)
    for t in threads:
        t.join()
    rss.append((time.perf_counter() - t0, server.rss_mb()))
    # nothing may stay held once every stream has ended (give the scheduler a moment to free the last rows)
    deadline = time.time() + 10
    while True:
        h = server.health()
        if (h["active"], h["waiting"], h["cached_tokens"]) == (0, 0, 0) or time.time() > deadline:
            break
        time.sleep(0.2)
    warm_rss = next(m for t, m in rss if t >= warm) if any(t >= warm for t, _ in rss) else rss[0][1]
    end_rss = rss[-1][1]
    ok = [r for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    # time to first token in the steady state: streams begun after the warm-up (all, if the soak is that short)
    ttft = sorted(r["ttft"] for r in ok if r["began"] >= warm) or sorted(r["ttft"] for r in ok) or [float("nan")]
    return {"streams": len(results), "errors": len(errors), "first_errors": Counter(errors).most_common(3),
            "tokens": sum(r["tokens"] for r in ok), "wall": rss[-1][0], "ttft_p50": statistics.median(ttft),
            "ttft_p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], "warm_s": warm, "warm_rss": warm_rss,
            "end_rss": end_rss, "max_rss": max(m for _, m in rss), "rss_growth": end_rss / warm_rss - 1,
            "health_after": h, "leak": (h["active"], h["waiting"], h["cached_tokens"]) != (0, 0, 0)}


# ---------------------------------------------------------------- 3. concurrent feedback

def feedback_burst(server: Server, model: str, threads: int, posts: int, db: Path) -> dict:
    """``threads`` threads, each posting ``posts`` feedback items over one keep-alive connection."""
    marker = f"fuzz_and_soak {time.time_ns()}"
    failures, lock = [], threading.Lock()
    start = threading.Barrier(threads)

    def worker(w):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        start.wait()  # all at once
        for i in range(posts):
            conv = [{"role": "user", "content": f"{marker} thread {w} post {i}"}]
            item = ({"kind": "rating", "messages": conv, "answer": f"answer {i}", "rating": 1 if i % 2 else -1}
                    if i % 3 else {"kind": "comparison", "messages": conv, "answers": ["a", "b"], "preferred": i % 2})
            try:
                conn.request("POST", "/v1/feedback", body=json.dumps({**item, "model": model}),
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                body = r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
            except Exception as e:
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.close()

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    con = sqlite3.connect(db)
    try:
        rows, distinct = con.execute("SELECT COUNT(*), COUNT(DISTINCT messages) FROM feedback WHERE messages LIKE ?",
                                     (f"%{marker}%",)).fetchone()
    finally:
        con.close()
    return {"rows": rows, "distinct": distinct, "failures": len(failures), "first_failures": failures[:3],
            "wall": wall, "posts_per_s": threads * posts / wall}


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fuzz-cases", type=int, default=1000, help="at least this many generated requests")
    ap.add_argument("--soak-minutes", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 20+ fuzz cases, a 5 s soak of 4 clients, 2 x 5 feedback posts")
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients in the soak")
    ap.add_argument("--max-tokens", type=int, default=32, help="per soak stream")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--block", type=int, default=128, help="the tiny model's context: bounds every max_tokens")
    ap.add_argument("--fb-threads", type=int, default=8)
    ap.add_argument("--fb-posts", type=int, default=500, help="feedback posts per thread")
    ap.add_argument("--header-cases", type=int, default=1000, help="raw requests with fuzzed headers, per server")
    ap.add_argument("--keyed-cases", type=int, default=300, help="schema fuzz cases against the --api-key server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-failures", default=None, metavar="JSONL", help="append every 5xx case (with its curl) here")
    a = ap.parse_args()
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()

    import torch

    from chatfactory.train.meters import measure_matmul_peak

    peak = measure_matmul_peak(torch.device("cpu"), n=1024, seconds=1.0)  # before the server takes the CPU
    print(f"fp32 matmul peak measured: {peak / 1e9:.1f} GFLOP/s", flush=True)
    tmp = tempfile.TemporaryDirectory()
    run = build_run(Path(tmp.name) / "fuzz", a.block)
    failed = []
    with Server(run, a.slots) as server:
        model = server.health()["model"]
        print(f"server: {model} at {server.url} (pid {server.proc.pid}), {a.slots} slots, context {a.block}",
              flush=True)

        # 1. fuzzing
        t = time.perf_counter()
        fz = fuzz(server.url, a.fuzz_cases, a.seed, a.save_failures)
        alive = server.health()["status"] == "ok"
        print(f"\nfuzzing: {fz['cases']} cases in {time.perf_counter() - t:.0f} s over {len(fz['operations'])} "
              f"operations; statuses {dict(sorted(fz['status'].items()))}")
        for op in fz["operations"]:
            ok = ", ".join(f"{n} {k.split()[-1]}" for k, n in sorted(fz["answered"].items()) if k.startswith(op + " "))
            print(f"  {fz['by_op'][op]:>5}  {op}" + (f"  (2xx: {ok})" if ok else ""))
        print(f"  5xx: {fz['5xx']}, schema failures: {fz['schema_failures']}, "
              f"transport errors: {fz['transport_errors']}, /health after: {'ok' if alive else 'DOWN'}")
        for kind, op, detail in fz["examples"]:
            print(f"  --- {kind} on {op}:\n    " + detail.replace("\n", "\n    "))
        if fz["informative"]:
            print("  informative (not failures): "
                  + ", ".join(f"{k} x{v}" for k, v in sorted(fz["informative"].items())))
            for key, text in fz["informative_examples"]:
                print(f"    e.g. {key}: {text}")
        if fz["5xx"] or fz["schema_failures"] or fz["transport_errors"] or not alive or fz["cases"] < a.fuzz_cases:
            failed.append("fuzzing")

        # 2. load and soak
        print(f"\nsoak: {a.clients} streaming clients for {a.soak_minutes:g} min, max_tokens={a.max_tokens}",
              flush=True)
        sk = soak(server, model, a.soak_minutes, a.clients, a.max_tokens)
        print(f"  {sk['streams']} streams, {sk['tokens']} tokens in {sk['wall']:.0f} s "
              f"({sk['tokens'] / sk['wall']:.0f} tok/s), errors {sk['errors']}"
              + (f" {sk['first_errors']}" if sk["errors"] else ""))
        print(f"  TTFT p50 {sk['ttft_p50'] * 1000:.0f} ms, p95 {sk['ttft_p95'] * 1000:.0f} ms (streams begun after "
              f"the warm-up)")
        print(f"  server RSS: {sk['warm_rss']:.1f} MB after the {sk['warm_s']:.0f} s warm-up, "
              f"{sk['end_rss']:.1f} MB at the end (max {sk['max_rss']:.1f}): growth {sk['rss_growth'] * 100:+.1f}% "
              f"(limit ±10%)")
        print(f"  /health after: {sk['health_after']}")
        if sk["errors"] or abs(sk["rss_growth"]) > 0.10 or sk["leak"]:
            failed.append("soak")

        # 3. concurrent feedback
        fb = feedback_burst(server, model, a.fb_threads, a.fb_posts, run / "feedback.sqlite")
        want = a.fb_threads * a.fb_posts
        print(f"\nfeedback: {a.fb_threads} threads x {a.fb_posts} posts in {fb['wall']:.1f} s "
              f"({fb['posts_per_s']:.0f}/s): {fb['rows']} rows ({fb['distinct']} distinct) in "
              f"{run / 'feedback.sqlite'}, expected {want}; "
              f"failed posts {fb['failures']}" + (f" {fb['first_failures']}" if fb["failures"] else ""))
        if fb["rows"] != want or fb["distinct"] != want or fb["failures"]:
            failed.append("feedback")

        # 4. headers
        hd = fuzz_headers(server.port, a.header_cases, a.seed)
        print(f"\nheaders: {hd['cases']} raw requests, statuses {dict(sorted(hd['status'].items()))}, closed "
              f"unanswered {hd['closed']}, 5xx {hd['5xx']}, failures {hd['failures']}")
        for e in hd["examples"]:
            print(f"  --- {e}")
        if hd["5xx"] or hd["failures"]:
            failed.append("headers")
        if server.proc.poll() is not None or server.health()["status"] != "ok":
            failed.append("server down at the end")
        if failed:
            print(f"\nserver log tail:\n{server.log_tail()}")

    # 5. --api-key mode: the schema fuzzing and the header fuzzing against a keyed server
    key = f"fuzz-{time.time_ns()}"
    with Server(run, a.slots, api_key=key) as keyed:
        kz = fuzz(keyed.url, a.keyed_cases, a.seed + 1, a.save_failures, api_key=key)
        kh = fuzz_headers(keyed.port, a.header_cases, a.seed + 1, api_key=key)
        req = urllib.request.Request(keyed.url + "/v1/models")
        try:
            urllib.request.urlopen(req, timeout=10)
            unkeyed = 200
        except urllib.error.HTTPError as e:
            unkeyed = e.code
        print(f"\n--api-key: {kz['cases']} fuzz cases, statuses {dict(sorted(kz['status'].items()))}, 5xx {kz['5xx']}, "
              f"schema failures {kz['schema_failures']}, transport errors {kz['transport_errors']}; headers: "
              f"{kh['cases']} requests, 5xx {kh['5xx']}, failures {kh['failures']}; without the key: {unkeyed}")
        for kind, op, detail in kz["examples"][:3]:
            print(f"  --- {kind} on {op}:\n    " + detail.replace("\n", "\n    "))
        if any((kz["5xx"], kz["schema_failures"], kz["transport_errors"], kh["5xx"], kh["failures"], unkeyed != 401)):
            failed.append("--api-key mode")
            print(f"\nkeyed server log tail:\n{keyed.log_tail()}")
    tmp.cleanup()
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    print(f"RESULT fuzz_cases={fz['cases']} fuzz_5xx={fz['5xx']} schema_failures={fz['schema_failures']} "
          f"soak_errors={sk['errors']} rss_growth={sk['rss_growth']:+.3f} ttft_p95_ms={sk['ttft_p95'] * 1000:.0f} "
          f"feedback_rows={fb['rows']} header_cases={hd['cases'] + kh['cases']} header_5xx={hd['5xx'] + kh['5xx']} "
          f"keyed_cases={kz['cases']} keyed_5xx={kz['5xx']} soak_minutes={a.soak_minutes:.3g} "
          f"matmul_peak_gflops={peak / 1e9:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
