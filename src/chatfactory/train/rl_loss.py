"""The loss arithmetic every RL algorithm shares: masked means, how a minibatch's per-token losses add up
(``loss_agg``) and the two estimators of the KL to the reference. PPO's own math (GAE, whitening, the
clipped losses) is in train/ppo.py, the group baselines in train/grpo.py and train/rloo.py."""

from __future__ import annotations

import torch

from .loop import all_reduce_sum


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


# How a minibatch's per-token losses become one number (``loss_agg``). Its pieces are micro-batches
# (grad_accum) and ranks, so each weighs its tokens against counts of the whole minibatch: one batch of 8
# and 2 micro-batches or 2 ranks of 4 then have the same gradients (tests/test_rl_aggregation.py).
AGGREGATIONS = {
    "token-mean": "every real token of the minibatch counts alike (DAPO)",
    "seq-mean-token-mean": "each answer's mean over its tokens, averaged over answers (the original GRPO)",
    "seq-mean-token-sum-norm": "each answer's sum over its tokens / max_new_tokens, averaged over answers (Dr. GRPO)",
}


def loss_weights(mask: torch.Tensor, how: str, max_len: int, shares: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A minibatch's answer mask (this rank's rows) -> (per-token weights, norm) such that the minibatch's
    loss is sum(weight * per-token loss) / norm, summed over every piece of it. The counts are of every
    rank's rows (one all-reduce), and the norm is divided by ``shares`` = grad_accum * world because the
    loop divides each micro-batch's loss by grad_accum and DDP averages the gradients over ranks."""
    mask = mask.float()
    tokens, answers = all_reduce_sum(torch.stack([mask.sum(), mask.new_tensor(float(len(mask)))]))
    if how == "token-mean":
        weight, norm = mask, tokens.clamp(min=1)
    elif how == "seq-mean-token-mean":
        weight, norm = mask / mask.sum(1, keepdim=True).clamp(min=1), answers
    else:
        weight, norm = mask, answers * max_len
    return weight, norm / shares


def aggregate(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    """A micro-batch's share of its minibatch's loss (see ``loss_weights``)."""
    return (per_token * batch["loss_weight"]).sum() / batch["loss_norm"]


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_ref: unbiased for KL(pi || ref) on samples of pi, but any single term can be < 0."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(ratio - 1) - log ratio with ratio = pi_ref / pi: unbiased and never negative (Schulman's k3)."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio
