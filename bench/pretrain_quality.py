"""Quality at a fixed wall-clock budget: the `shakespeare` preset on tiny Shakespeare, 2-core CPU.

The number of steps is set so that the whole run — tokenizer, tokenization, training and the
validation passes — fits the budget (default 300 s), from a throughput measured on this machine
first. Prints the validation curve in bits per byte (per byte, not per token, so any tokenizer
compares fairly with nanoGPT's character model) and the total seconds.

    .venv/bin/python bench/pretrain_quality.py [--budget 300] [key=value overrides of the preset]
    .venv/bin/python bench/pretrain_quality.py --quick   # smoke test (tests/test_benches.py): a 12 s budget,
                                                         # a 1-layer model, the first 200k characters

Last line: ``RESULT val_bpb=… seconds=… steps=…`` (steps: the optimizer steps the budget allowed).

Anchor (nanoGPT's CPU configuration, character-level, measured on this machine): 2.70 bits/byte
after 85 s, 2.28 bits/byte after 4 min 45 s. Run it alone: other load on 2 cores is noise.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from chatfactory.config import load_config
from chatfactory.model.gpt import GPT
from chatfactory.train.loop import make_optimizer
from chatfactory.train.pretrain import run_pretrain

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain" / "tinyshakespeare" / "input.txt"
# --quick: a short budget and a small model on the first 200k characters (overrides given on the command
# line replace these)
QUICK = dict(budget=12.0, overrides=["data.max_chars=200000", "tokenizer.train_chars=150000",
                                     "tokenizer.vocab_size=512", "model.depth=1", "model.block_size=64",
                                     "pretrain.seq_len=64", "pretrain.batch_size=4", "pretrain.eval_batches=8"])


def step_seconds(cfg, vocab: int) -> float:
    """Seconds per optimizer step of the preset's model on this machine."""
    import dataclasses

    model = GPT(dataclasses.replace(cfg.model, vocab_size=vocab))
    opt = make_optimizer(model, cfg.pretrain, torch.device("cpu"))
    b, t = cfg.pretrain.batch_size, cfg.pretrain.seq_len
    x = torch.randint(0, vocab, (b, t + 1))
    times = []
    for i in range(8):
        t0 = time.perf_counter()
        for _ in range(cfg.pretrain.grad_accum):
            model(x[:, :-1], targets=x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=300.0, help="wall-clock seconds for the whole run")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--keep", default=None, help="keep the run directory here (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, seconds (the same code)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    if not Path(a.data).exists():
        sys.exit(f"tiny Shakespeare not found at {a.data} (pass --data PATH)")
    t_start = time.perf_counter()
    cfg = load_config("shakespeare", [f"data.source={a.data}", "pretrain.progress=false", *a.overrides])
    per_step = step_seconds(cfg, cfg.tokenizer.vocab_size)
    n_evals = 6
    # reserve time for tokenizer+tokenization (~5 s), the evaluations and the calibration already spent
    b, t = cfg.pretrain.batch_size, cfg.pretrain.seq_len
    val_tokens = min(0.1 * 1.1e6 / 3.0, cfg.pretrain.eval_batches * b * t)  # the preset's: the whole split
    eval_cost = 0.35 * per_step * val_tokens / (b * t)
    left = a.budget - (time.perf_counter() - t_start) - 8.0 - n_evals * eval_cost
    steps = int(left / (per_step * 1.03))
    cfg = load_config("shakespeare", [f"data.source={a.data}", "pretrain.progress=false", f"pretrain.steps={steps}",
                                      f"pretrain.eval_every={max(1, steps // n_evals)}",
                                      f"pretrain.ckpt_every={steps}", *a.overrides])
    print(f"{per_step * 1000:.0f} ms/step measured -> {steps} steps of "
          f"{cfg.pretrain.batch_size}x{cfg.pretrain.seq_len} tokens")
    run = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="shakespeare-"))
    if run.exists() and a.keep:
        shutil.rmtree(run)
    try:
        res = run_pretrain(cfg, run)
        rows = [json.loads(x) for x in open(run / "pretrain" / "metrics.jsonl")]
        t0 = t_start
        print("step  train_s  val_loss(nats/token)  val_bpb")
        elapsed = {r["step"]: r["elapsed"] for r in rows if "elapsed" in r}
        for r in rows:
            if "val_bpb" in r:
                print(f"{r['step']:5d}  {elapsed.get(r['step'], 0):7.1f}  {r['val_loss']:20.4f}  {r['val_bpb']:.4f}")
    finally:
        if not a.keep:
            shutil.rmtree(run, ignore_errors=True)
    seconds = time.perf_counter() - t0
    print(f"RESULT val_bpb={res['val_bpb']:.4f} seconds={seconds:.1f} steps={steps}")


if __name__ == "__main__":
    main()
