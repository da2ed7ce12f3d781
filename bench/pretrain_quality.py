"""Quality at a fixed wall-clock budget: the `shakespeare` preset on tiny Shakespeare, 2-core CPU.

The whole run — tokenizer, tokenization, training and the validation passes — fits the budget (default
300 s) by the clock: the tokenizer and the shards are made first, and what is left goes to the training
loop as ``pretrain.time_budget``, which trains until the next step, the final evaluation and checkpoint
(their costs as measured in this run) would not fit, decaying the learning rate over the time. No step
count is estimated up front. Prints the validation curve in bits per byte (per byte, not per token, so
any tokenizer compares fairly with nanoGPT's character model), the budget, the time used and the steps
reached.

    .venv/bin/python bench/pretrain_quality.py [--budget 300] [key=value overrides of the preset]
    .venv/bin/python bench/pretrain_quality.py --quick   # smoke test (tests/test_benches.py): a 12 s budget,
                                                         # a 1-layer model, the first 200k characters

Last line: ``RESULT val_bpb=… budget=… seconds=… steps=…`` (seconds: the whole run's wall clock; steps:
the optimizer steps the budget allowed).

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

from chatfactory.config import load_config
from chatfactory.data.shards import build_shards
from chatfactory.data.sources import iter_texts
from chatfactory.train.pretrain import ensure_tokenizer, run_pretrain

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain" / "tinyshakespeare" / "input.txt"
# --quick: a short budget and a small model on the first 200k characters (overrides given on the command
# line replace these)
QUICK = dict(budget=12.0, overrides=["data.max_chars=200000", "tokenizer.train_chars=150000",
                                     "tokenizer.vocab_size=512", "model.depth=1", "model.block_size=64",
                                     "pretrain.seq_len=64", "pretrain.batch_size=4", "pretrain.eval_batches=8"])


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
    run = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="shakespeare-"))
    if run.exists() and a.keep:
        shutil.rmtree(run)
    base = [f"data.source={a.data}", "pretrain.progress=false", *a.overrides]
    try:
        # the tokenizer and the shards first (run_pretrain reuses both), so the loop gets what is left
        cfg = load_config("shakespeare", base)
        run.mkdir(parents=True, exist_ok=True)
        tok = ensure_tokenizer(cfg, run)
        build_shards(iter_texts(cfg.data), tok, run / "data", cfg.data, progress=False)
        prep = time.perf_counter() - t_start
        # a second for building the model and reading the shards before the loop's clock starts
        left = a.budget - prep - 1.0
        if left <= 0:
            sys.exit(f"the tokenizer and tokenization took {prep:.1f} s of a {a.budget:.0f} s budget")
        cfg = load_config("shakespeare", [*base, f"pretrain.time_budget={left:.1f}", "pretrain.steps=1000000000"])
        print(f"budget {a.budget:.0f} s: {prep:.1f} s tokenizer and tokenization, {left:.1f} s for the training "
              f"loop (batches of {cfg.pretrain.batch_size}x{cfg.pretrain.seq_len} tokens)")
        res = run_pretrain(cfg, run)
        rows = [json.loads(x) for x in open(run / "pretrain" / "metrics.jsonl")]
        print("step  train_s  val_loss(nats/token)  val_bpb")
        elapsed = {r["step"]: r["elapsed"] for r in rows if "elapsed" in r}
        for r in rows:
            if "val_bpb" in r:
                print(f"{r['step']:5d}  {elapsed.get(r['step'], 0):7.1f}  {r['val_loss']:20.4f}  {r['val_bpb']:.4f}")
        steps = max(r["step"] for r in rows)
    finally:
        if not a.keep:
            shutil.rmtree(run, ignore_errors=True)
    seconds = time.perf_counter() - t_start
    print(f"budget {a.budget:.0f} s, used {seconds:.1f} s, {steps} steps reached")
    print(f"RESULT val_bpb={res['val_bpb']:.4f} budget={a.budget:.0f} seconds={seconds:.1f} steps={steps}")


if __name__ == "__main__":
    main()
