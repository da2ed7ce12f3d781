"""CUDA check of the RL stages on a lent GPU (not part of CI): the tiny world of tests/test_ppo.py (SFT
policy that says "blue" about a quarter of the time), a reward model, then PPO and GRPO on CUDA with
bf16 autocast; prints the held-out gold score before and after and the last iteration's logs.

    PYTHONPATH=src python3 bench/rl_gpu_check.py
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_ppo as W  # noqa: E402

from chatfactory.config import Config, GRPOConfig  # noqa: E402
from chatfactory.data.preferences import load_prompts  # noqa: E402
from chatfactory.store.load import load_model
from chatfactory.train.grpo import run_grpo  # noqa: E402
from chatfactory.train.ppo import run_ppo  # noqa: E402
from chatfactory.train.selection import gold_score  # noqa: E402


def main():
    print("torch", torch.__version__, torch.cuda.get_device_name())
    root = Path(tempfile.mkdtemp())
    run, tok = W.build_world(root)
    sys.path.insert(0, str(root))
    print("reward model:", W.train_reward_model(root, run, tok))
    held = load_prompts(str(root / "heldout.jsonl")) * 4
    before = gold_score(load_model(run / "sft", "cuda")[0], tok, held, W.gold, max_new_tokens=6, seed=1)
    t = time.perf_counter()
    res = run_ppo(W.ppo_config(root, device="cuda"), run)
    ppo = load_model(run / "ppo", "cuda")[0]
    after = gold_score(ppo, tok, held, W.gold, max_new_tokens=6, seed=1)
    print(f"PPO on CUDA ({time.perf_counter() - t:.1f} s): gold {before:.3f} -> {after:.3f}; {res}")
    cfg = Config()
    cfg.grpo = GRPOConfig(prompts=str(root / "prompts.jsonl"), reward="rl_gold:score", steps=12, rollout_batch=8,
                          group_size=4, max_new_tokens=6, lr=3e-4, kl_coef=0.05, ppo_epochs=2, minibatches=2,
                          eval_every=0, ckpt_every=5, progress=False, device="cuda", seed=3)
    t = time.perf_counter()
    res = run_grpo(cfg, run)
    after_g = gold_score(load_model(run / "grpo", "cuda")[0], tok, held, W.gold, max_new_tokens=6, seed=1)
    print(f"GRPO on CUDA ({time.perf_counter() - t:.1f} s): gold {before:.3f} -> {after_g:.3f}; {res}")
    ok = after > before + 0.2 and after_g > before + 0.2
    print(f"RESULT gold_sft={before:.3f} gold_ppo={after:.3f} gold_grpo={after_g:.3f} ok={int(ok)}")


if __name__ == "__main__":
    main()
