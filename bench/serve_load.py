"""Serving under load: 1, 4 and 16 concurrent streaming clients against a local `chatfactory serve`.

Starts the real server (a subprocess on 127.0.0.1 and a free port, continuous batching with 16 slots),
then for each concurrency level runs that many client threads, each streaming a bounded number of
chat completions over loopback. Reports aggregate completion tokens/s (from each stream's ``usage``),
p50/p95 time to first token, and errors; the ratio is the 16-client aggregate over the 1-client one
(target >= 4x with 0 errors: the batch shares decode steps, so more clients cost little more per step).

    .venv/bin/python bench/serve_load.py                       # a random-init model (depth 4, width 256)
    .venv/bin/python bench/serve_load.py --run runs/demo --stage sft
    .venv/bin/python bench/serve_load.py --requests 2 --max-tokens 32 --levels 1,4,16   # shorter
    .venv/bin/python bench/serve_load.py --compile    # then `serve --compile` under the same load: the ratios
    .venv/bin/python bench/serve_load.py --quick      # smoke test (tests/test_benches.py): tiny model, 1 and 4 clients

Last line: ``RESULT tok_s_LO=… tok_s_HI=… ratio=… p50_ttft_HI_ms=… p95_ttft_HI_ms=… errors=… requests=…``
(LO, HI: the first and last of --levels; requests: the streams sent in all levels together), with --compile
also ``compiled_tok_s_HI=… compiled_vs_eager_LO=… compiled_vs_eager_HI=… compiled_p95_ttft_HI_ms=…
compiled_errors=…``. Run it alone:
on a 2-core machine anything else running is noise (clients share the CPU too).
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

PROMPTS = ["Tell me about Python lists.", "What does the with statement do?", "Explain generators, briefly.",
           "How do I read a file?", "What is a decorator?", "Say something about dictionaries."]
# --quick: a tiny random model, 1 then 4 clients, one short stream each
QUICK = dict(depth=2, width=64, block=128, levels="1,4", requests=1, max_tokens=8, slots=4, compile=True)


def make_random_run(root: Path, depth: int, width: int, block: int) -> Path:
    """A run with a BPE tokenizer trained on the embedded text and a random-init model (speed only)."""
    import itertools

    import torch

    from chatfactory.data.embedded import pydoc_topics
    from chatfactory.model.gpt import GPT, GPTConfig
    from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
    from chatfactory.text.tokenizer import Tokenizer

    tok = Tokenizer.train(itertools.islice(pydoc_topics(), 200), vocab_size=2048)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    cfg = GPTConfig(depth=depth, n_embd=width, vocab_size=tok.vocab_size, block_size=block)
    save_checkpoint(root / "sft", unique_state_dict(GPT(cfg)), {"model": cfg.to_dict()})
    return root


def one_stream(port: int, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    """One streaming chat completion -> {ttft, tokens, ok, error}."""
    return stream_chat(port, {"model": model, "messages": [{"role": "user", "content": prompt}],
                              "max_tokens": max_tokens, "temperature": 1.0, "seed": seed})


def stream_chat(port: int, body: dict, timeout: float = 120) -> dict:
    """One streamed chat completion of ``body`` (stream and usage asked for here) -> {ok, ttft, tokens (the
    usage's, else the pieces seen), text} or {ok: False, error}. bench/serve_real.py reads llama-server with it."""
    raw = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    ttft, tokens, text, done = None, None, [], False
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("POST", "/v1/chat/completions", body=raw, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return {"ok": False, "error": f"HTTP {r.status}: {r.read()[:200]!r}"}
        for line in r:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            j = json.loads(data)
            if "error" in j:
                return {"ok": False, "error": str(j["error"])[:200]}
            if j.get("usage"):
                tokens = j["usage"]["completion_tokens"]
            for c in j.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    text.append(piece)
                    if ttft is None:
                        ttft = time.perf_counter() - t0
        conn.close()
    except OSError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if not done:
        return {"ok": False, "error": "stream ended without [DONE]"}
    return {"ok": True, "ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "tokens": tokens if tokens is not None else len(text), "text": "".join(text)}


def run_level(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    return run_clients(clients, requests, lambda c, r: one_stream(port, model, PROMPTS[(c + r) % len(PROMPTS)],
                                                                  max_tokens, seed=1000 * c + r))


def run_clients(clients: int, requests: int, ask) -> dict:
    """``clients`` threads at once, each making ``requests`` streams one after another (``ask(client, i)``: one
    stream's result) -> aggregate tokens/s, TTFT p50/p95, errors (bench/serve_real.py loads with it too)."""
    results, lock = [], threading.Lock()

    def client(c):
        for r in range(requests):
            res = ask(c, r)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttfts = sorted(r["ttft"] for r in ok) or [float("nan")]

    def q(p):
        return ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))]

    errors = [r["error"] for r in results if not r["ok"]]
    return {"clients": clients, "requests": len(results), "tokens": sum(r["tokens"] for r in ok), "wall": wall,
            "tok_s": sum(r["tokens"] for r in ok) / wall, "p50": statistics.median(ttfts), "p95": q(0.95),
            "errors": len(errors), "first_error": errors[0] if errors else ""}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="serve this run (default: a random-init model in a temp dir)")
    ap.add_argument("--stage", default=None)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per phase")
    ap.add_argument("--requests", type=int, default=3, help="streams per client per phase (bounded load)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--compile", action="store_true",
                    help="then the same load on `serve --compile` (the compiled decode step), and their ratios")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, seconds (the same code)")
    a = ap.parse_args()
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]

    tmp = tempfile.TemporaryDirectory()
    run = Path(a.run) if a.run else make_random_run(Path(tmp.name) / "bench", a.depth, a.width, a.block)
    try:
        res = measure(run, a, levels)
        # --compile: the same load on a server decoding with the compiled step, right after, in this process
        fast = measure(run, a, levels, ["--compile"]) if a.compile else None
    finally:
        tmp.cleanup()
    lo, hi = levels[0], levels[-1]
    ratio = res[hi]["tok_s"] / res[lo]["tok_s"]
    errors = sum(r["errors"] for r in res.values())
    print(f"aggregate tokens/s at {hi} clients = {ratio:.2f}x the {lo}-client figure (target >= 4x, 0 errors)")
    line = (f"RESULT tok_s_{lo}={res[lo]['tok_s']:.1f} tok_s_{hi}={res[hi]['tok_s']:.1f} ratio={ratio:.2f} "
            f"p50_ttft_{hi}_ms={res[hi]['p50'] * 1000:.0f} p95_ttft_{hi}_ms={res[hi]['p95'] * 1000:.0f} "
            f"errors={errors} requests={sum(r['requests'] for r in res.values())}")
    if fast is not None:
        print(f"compiled step: {fast[lo]['tok_s'] / res[lo]['tok_s']:.2f}x eager at {lo} client(s), "
              f"{fast[hi]['tok_s'] / res[hi]['tok_s']:.2f}x at {hi}")
        line += (f" compiled_tok_s_{hi}={fast[hi]['tok_s']:.1f} "
                 f"compiled_vs_eager_{lo}={fast[lo]['tok_s'] / res[lo]['tok_s']:.2f} "
                 f"compiled_vs_eager_{hi}={fast[hi]['tok_s'] / res[hi]['tok_s']:.2f} "
                 f"compiled_p95_ttft_{hi}_ms={fast[hi]['p95'] * 1000:.0f} "
                 f"compiled_errors={sum(r['errors'] for r in fast.values())}")
    print(line)


def measure(run: Path, a, levels: list[int], extra: list[str] = ()) -> dict:
    """Start `chatfactory serve` on ``run`` (with ``extra`` arguments), run every level against it, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "chatfactory.cli", "serve", "--run", str(run), "--port", str(port),
           "--slots", str(a.slots), *extra]
    if a.stage:
        cmd += ["--stage", a.stage]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "CHATFACTORY_API_KEY": ""})
    try:
        deadline = time.time() + 600  # --compile compiles every attention window before /health answers
        while True:
            try:
                health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2))
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not start:\n"
                                     f"{server.stdout.read() if server.poll() is not None else 'timeout'}") from None
                time.sleep(0.3)
        model = health["model"]
        one_stream(port, model, "warm up", 8, 0)  # first-call costs (allocation, lazy init) stay out of the numbers
        print(f"server{' ' + ' '.join(extra) if extra else ''}: {model} on 127.0.0.1:{port}, {a.slots} slots; "
              f"{a.requests} streams/client, max_tokens={a.max_tokens}")
        print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'p50 TTFT':>9} "
              f"{'p95 TTFT':>9} {'errors':>6}")
        res = {}
        for c in levels:
            r = res[c] = run_level(port, model, c, a.requests, a.max_tokens)
            print(f"{c:>7} {r['requests']:>8} {r['tokens']:>7} {r['wall']:>7.2f} {r['tok_s']:>8.1f} "
                  f"{r['p50'] * 1000:>7.0f}ms {r['p95'] * 1000:>7.0f}ms {r['errors']:>6}"
                  + (f"  ({r['first_error']})" if r["errors"] else ""))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return res


if __name__ == "__main__":
    main()
