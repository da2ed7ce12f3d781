"""Continuous batching without HTTP: the scheduler's aggregate decode speed at 1 and N concurrent
requests, beside the engine's static batch of N, in one process (CPU or GPU).

First checks that the scheduler's greedy tokens equal the engine's for prompts of different lengths
joining at different steps (so the speed is of correct decoding), then times:
  engine_1    Engine.generate on one prompt                  (the single-stream baseline)
  sched_1     the scheduler with one request
  sched_N     the scheduler with N requests submitted at once (aggregate tokens/s)
  engine_N    Engine.generate on the same N prompts as one static batch (what batching can reach)

    .venv/bin/python bench/batching_speed.py [--depth 4 --width 256 --n 16 --tokens 128 --device auto]
    .venv/bin/python bench/batching_speed.py --quick   # smoke test (tests/test_benches.py): tiny sizes, n=4

Last line: ``RESULT device=… equal=… tok_s_1=… tok_s_N=… ratio=… vs_static=… overhead_1=…`` (equal: 1 when
the scheduler's greedy tokens equal the engine's). Run it alone: on a 2-core machine anything else running
is noise.
"""

import argparse
import time

import torch

from chatfactory.inference.batching import Request, Scheduler
from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig

# --quick: a tiny model, 4 requests of 8 tokens
QUICK = dict(depth=2, width=64, vocab=256, n=4, tokens=8, prompt=8)


def check_equal(model, device):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 1, 40, 9, 25)]
    p = SamplingParams(max_tokens=24, temperature=0)
    alone = [Engine(model).generate([x], p)[0] for x in prompts]
    sched = Scheduler(model, slots=4, start=False)
    outs = [[] for _ in prompts]
    for i, x in enumerate(prompts):
        sched.submit(Request(x, p, emit=lambda st, i=i: st.token is not None and outs[i].append(st.token)))
        sched.step()  # each joins one step after the previous
    sched.run_until_idle()
    same = sum(a == b for a, b in zip(outs, alone))
    print(f"greedy tokens equal to the engine's: {same}/{len(prompts)} prompts")
    return same == len(prompts)


def timed(fn, device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--n", type=int, default=16, help="concurrent requests")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, seconds (the same code)")
    a = ap.parse_args()
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=a.depth, n_embd=a.width, vocab_size=a.vocab,
                          block_size=max(256, a.prompt + a.tokens + 1))).to(device).eval()
    print(f"{device}: depth {a.depth}, width {a.width}, {model.num_params() / 1e6:.1f}M params; n={a.n}, "
          f"{a.tokens} new tokens each")
    ok = check_equal(model, device)

    p = SamplingParams(max_tokens=a.tokens, temperature=1.0, seed=0)  # no stop ids: every row runs to max_tokens
    prompts = [[(7 * i + j) % a.vocab for j in range(a.prompt)] for i in range(a.n)]
    sched = Scheduler(model, slots=a.n, start=False)

    def run_sched(k):
        def go():
            for x in prompts[:k]:
                sched.submit(Request(x, SamplingParams(max_tokens=a.tokens, temperature=1.0), emit=lambda st: None))
            sched.run_until_idle()
        return go

    eng = Engine(model)
    t = {
        "engine_1": timed(lambda: eng.generate(prompts[:1], p), device),
        "sched_1": timed(run_sched(1), device),
        f"sched_{a.n}": timed(run_sched(a.n), device),
        f"engine_{a.n}": timed(lambda: eng.generate(prompts, p), device),
    }
    tok_s = {k: (a.n if k.endswith(f"_{a.n}") else 1) * a.tokens / v for k, v in t.items()}
    for k, v in tok_s.items():
        print(f"{k:>10}: {v:10.1f} tok/s")
    overhead = tok_s["sched_1"] / tok_s["engine_1"]
    ratio = tok_s[f"sched_{a.n}"] / tok_s["sched_1"]
    vs_static = tok_s[f"sched_{a.n}"] / tok_s[f"engine_{a.n}"]
    print(f"scheduler alone vs engine alone: {overhead:.2f}x; scheduler at {a.n} vs at 1: {ratio:.2f}x; "
          f"scheduler at {a.n} vs the engine's static batch: {vs_static:.2f}x")
    print(f"RESULT device={device.type} equal={int(ok)} tok_s_1={tok_s['sched_1']:.1f} "
          f"tok_s_{a.n}={tok_s[f'sched_{a.n}']:.1f} ratio={ratio:.2f} vs_static={vs_static:.2f} "
          f"overhead_1={overhead:.2f}")


if __name__ == "__main__":
    main()
