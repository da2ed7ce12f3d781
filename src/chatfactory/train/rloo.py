"""RLOO: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, "Back to
Basics"), for rewards a program can check or a reward model gives.

As GRPO (train/grpo.py) it samples ``group_size`` answers to each prompt and needs no critic. Each
answer's baseline is the mean score of the *other* answers to its prompt:

    A_i = r_i - (sum_j r_j - r_i) / (K - 1)  =  K / (K - 1) * (r_i - mean_j r_j)

The baseline does not depend on the answer it judges, so the estimate stays unbiased; GRPO's group mean
includes the answer itself, and its std rescales every group. With ``kl_coef > 0`` the KL to the
reference is a per-token reward by default (``kl_estimator: k1``, as RLOO puts the KL in the reward).
RLOO is GRPO's algorithm with this baseline in place of the group normalisation
(``GRPO(settings, baseline=leave_one_out_baseline)``): the clipped loss (with one update per rollout,
the ratio is 1 and the loss is plain REINFORCE), the KL, loss aggregation; and the rollouts, logging,
checkpoints and exact resume are every RL stage's (train/rl.py).

    chatfactory rloo --config tiny --out runs/NAME rloo.prompts=prompts.jsonl \\
        rloo.reward=chatfactory.data.tasks:rubric_score rloo.steps=50
"""

from __future__ import annotations

import torch

from ..config import Config
from .grpo import GRPO, check_group_settings
from .rl import run_rl


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) rewards, groups of ``group_size`` contiguous -> (B,) each minus the mean of the others."""
    r = rewards.view(-1, group_size).float()
    others = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return (r - others).view(-1)


def leave_one_out_baseline(score: torch.Tensor, settings) -> torch.Tensor:
    """(B,) scores -> (B,) advantages: RLOO's baseline, in place of GRPO's group normalisation."""
    k = settings.group_size
    adv = leave_one_out_advantages(score, k)
    if settings.scale_rewards:  # off by default; on, over the group's std as GRPO divides
        adv = (adv.view(-1, k) / (score.view(-1, k).float().std(1, keepdim=True) + 1e-4)).view(-1)
    return adv


def run_rloo(cfg: Config, run_dir) -> dict:
    """RLOO from ``rloo.init_from`` against ``rloo.reward``; writes ``run_dir/rloo``. Re-running resumes."""
    check_group_settings(cfg.rloo, "rloo")
    return run_rl(cfg, run_dir, "rloo", GRPO(cfg.rloo, baseline=leave_one_out_baseline))
