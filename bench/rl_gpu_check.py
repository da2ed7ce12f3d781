"""CUDA check of the RL stages on a lent GPU (not part of CI): the tiny world of the RL tests
(tests/builders/rl_world.py: an SFT policy that says "blue" about a quarter of the time), a reward model,
then PPO and GRPO on CUDA with bf16 autocast; prints the held-out gold score before and after and the last
iteration's logs.

    PYTHONPATH=src python3 bench/rl_gpu_check.py
    .venv/bin/python bench/rl_gpu_check.py --quick    # smoke test (tests/test_benches.py): a shorter SFT,
                                                      # 4 PPO and 4 GRPO iterations; on the CPU without CUDA

Last line: ``RESULT gold_sft=… gold_ppo=… gold_grpo=… ok=… ppo_iters=… grpo_iters=… device=… skipped=…``
(ok: both raised the gold score by more than 0.2, which --quick's few iterations need not do; skipped:
``cuda`` where --quick ran on the CPU for want of a CUDA device, else none).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from builders import rl_world as W  # noqa: E402
from chatfactory.config import Config, GRPOConfig  # noqa: E402
from chatfactory.data.preferences import load_prompts  # noqa: E402
from chatfactory.store.load import load_model  # noqa: E402
from chatfactory.train.grpo import run_grpo  # noqa: E402
from chatfactory.train.ppo import run_ppo  # noqa: E402
from chatfactory.train.selection import gold_score  # noqa: E402

# --quick: a shorter SFT of the world's policy and 4 iterations of each RL stage
QUICK = dict(sft_steps=40, ppo_steps=4, grpo_steps=4)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-steps", type=int, default=120, help="SFT steps of the world's policy")
    ap.add_argument("--ppo-steps", type=int, default=12)
    ap.add_argument("--grpo-steps", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="smoke test: fewer steps; on the CPU where there is no CUDA")
    a = ap.parse_args()
    device, skipped = "cuda", "none"
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
        if not torch.cuda.is_available():
            device, skipped = "cpu", "cuda"
            print("CUDA: no device here: the CUDA run (bf16 autocast) is skipped; the same stages run on the CPU")
    print("torch", torch.__version__, torch.cuda.get_device_name() if device == "cuda" else "cpu")
    root = Path(tempfile.mkdtemp())
    run, tok = W.build_world(root, a.sft_steps)
    sys.path.insert(0, str(root))
    print("reward model:", W.train_reward_model(root, run, tok))
    held = load_prompts(str(root / "heldout.jsonl")) * 4
    before = gold_score(load_model(run / "sft", device)[0], tok, held, W.gold, max_new_tokens=6, seed=1)
    t = time.perf_counter()
    res = run_ppo(W.ppo_config(root, device=device, steps=a.ppo_steps), run)
    ppo = load_model(run / "ppo", device)[0]
    after = gold_score(ppo, tok, held, W.gold, max_new_tokens=6, seed=1)
    print(f"PPO on {device} ({time.perf_counter() - t:.1f} s): gold {before:.3f} -> {after:.3f}; {res}")
    ppo_iters = res["iteration"]
    cfg = Config()
    cfg.grpo = GRPOConfig(prompts=str(root / "prompts.jsonl"), reward="rl_gold:score", steps=a.grpo_steps,
                          rollout_batch=8, group_size=4, max_new_tokens=6, lr=3e-4, kl_coef=0.05, ppo_epochs=2,
                          minibatches=2, eval_every=0, ckpt_every=5, progress=False, device=device, seed=3)
    t = time.perf_counter()
    res = run_grpo(cfg, run)
    after_g = gold_score(load_model(run / "grpo", device)[0], tok, held, W.gold, max_new_tokens=6, seed=1)
    print(f"GRPO on {device} ({time.perf_counter() - t:.1f} s): gold {before:.3f} -> {after_g:.3f}; {res}")
    ok = after > before + 0.2 and after_g > before + 0.2
    print(f"RESULT gold_sft={before:.3f} gold_ppo={after:.3f} gold_grpo={after_g:.3f} ok={int(ok)} "
          f"ppo_iters={ppo_iters} grpo_iters={res['iteration']} device={device} skipped={skipped}")


if __name__ == "__main__":
    main()
