"""GRPO: group-relative policy optimisation (DeepSeekMath), for rewards a program can check.

Each iteration samples ``group_size`` answers to each of ``rollout_batch`` prompts, scores every answer
(a scorer ``module:function`` such as the task rubric, or a reward model), and gives each answer's
tokens the advantage (r - mean of its group) / std of its group: no critic, no GAE — the group is
the baseline (RLOO, train/rloo.py, changes only that). The loss is PPO's clipped surrogate
(train/ppo.py) aggregated by ``loss_agg``; the rollouts, minibatches, logging, checkpoints and exact
resume are every RL stage's (train/rl.py). With ``kl_coef > 0`` the KL to the reference enters one of
two ways (``kl_estimator``):

* ``k3`` (DeepSeekMath): a loss term, kl_coef times the k3 estimate of KL(pi || ref) on every token;
* ``k1``: a per-token reward -kl_coef * (log pi - log pi_ref), measured on the sampling policy as in
  PPO, so a token's advantage is its group advantage minus kl_coef times the KL still to come from it.
  (k1 as a *loss* term would do nothing: its gradient is zero in expectation on the policy's samples.)

    chatfactory grpo --config tiny --out runs/NAME grpo.prompts=prompts.jsonl \\
        grpo.reward=chatfactory.data.tasks:rubric_score grpo.steps=50
"""

from __future__ import annotations

import torch

from ..config import Config
from .ppo import gae, policy_loss, token_rewards
from .rl import run_rl
from .rl_loss import aggregate, kl_k1, kl_k3, masked_mean
from .rollout import answer_logprobs, logprobs_and_entropy


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(B,) rewards, groups contiguous -> (B,) advantages: minus the group mean, over the group std
    (unbiased, as DeepSeekMath). A group whose answers all score alike teaches nothing: 0."""
    r = rewards.view(-1, group_size).float()
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True, unbiased=True) + eps) if group_size > 1 else adv * 0
    return adv.view(-1)


def kl_shaped_advantages(adv: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(B,) answer advantages and (B, A) per-token k1 -> (B, A): each token's reward is -kl_coef * k1 (and the
    answer's advantage lands on its last token, as PPO's score does); with no critic, a token's advantage
    is the sum of the rewards from it to the end (GAE with V = 0, gamma = lambda = 1)."""
    rewards = token_rewards(adv, kl, mask, kl_coef)
    return gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)[0]


def group_baseline(score: torch.Tensor, settings) -> torch.Tensor:
    """(B,) scores -> (B,) advantages: GRPO's group normalisation (``scale_rewards``: over the group's std)."""
    return group_advantages(score, settings.group_size, settings.scale_rewards)


class GRPO:
    """A group-baseline algorithm's part of an RL stage (train/rl.py runs the iteration): ``baseline``
    turns the (B,) scores of ``group_size`` answers per prompt into advantages (GRPO's group
    normalisation here; RLOO's leave-one-out mean, train/rloo.py); no critic; PPO's clipped loss; the KL
    to the reference as a loss term (k3) or a per-token reward (k1)."""

    def __init__(self, settings, baseline=group_baseline):
        self.settings, self.baseline, self.kl_coef = settings, baseline, settings.kl_coef
        self.group = settings.group_size
        self.kl_in_reward = settings.kl_coef > 0 and settings.kl_estimator == "k1"
        # the sampling policy's log-probs need a forward pass of their own only if several updates share a
        # rollout (later ones need the ratio to the old policy) or k1 is measured on them; with one update
        # they are the live log-probs, detached, and the pass is skipped (TRL does the same)
        self.needs_old_logp = settings.ppo_epochs * settings.minibatches > 1 or self.kl_in_reward

    def make_critic(self, run_dir, reward, device) -> None:
        return None

    def advantages(self, exp: dict, log) -> dict:
        """-> {"advantages": (B, A)}: each answer's baseline advantage on its tokens, or with k1 shaped by
        the KL still to come; logs the reward."""
        s, mask, score = self.settings, exp["answer_mask"].float(), exp["score"]
        adv = self.baseline(score, s)
        if not self.kl_in_reward:
            log.rollout["reward"] = score.mean()
            return {"advantages": adv[:, None] * mask}
        kl = kl_k1(exp["old_logp"], exp["ref_logp"]) * mask
        log.rollout["reward"] = (score - s.kl_coef * kl.sum(1)).mean()
        return {"advantages": kl_shaped_advantages(adv, kl, mask, s.kl_coef)}

    def loss(self, model, batch: dict, log) -> torch.Tensor:
        s = self.settings
        mask = batch["answer_mask"].float()
        logits = model(batch)["logits"]
        if "old_logp" in batch:
            logp = answer_logprobs(logits, batch["tokens"], batch["start"], s.temperature)
        else:  # the rollout skipped the pass that logs entropy (and KL): log them from this one
            logp, ent = logprobs_and_entropy(logits, batch["tokens"], batch["start"], s.temperature)
        # one update per rollout: the sampling policy is the live one (ratio 1, gradient unchanged)
        old = batch["old_logp"] if "old_logp" in batch else logp.detach()
        per_token, stats = policy_loss(logp, old, batch["advantages"], mask, s.clip)
        loss = aggregate(per_token, batch)
        stats["pg_loss"] = loss.detach()
        if "old_logp" not in batch:
            log.mismatch.add(logp, batch)  # before the update: these are the weights that sampled
            with torch.no_grad():
                stats["entropy"] = masked_mean(ent, mask)
                if "ref_logp" in batch:
                    stats["kl"] = (kl_k1(logp, batch["ref_logp"]) * mask).sum(1).mean()
        if s.kl_coef > 0 and not self.kl_in_reward:
            kl = aggregate(kl_k3(logp, batch["ref_logp"]), batch)
            loss = loss + s.kl_coef * kl
            stats["kl_loss"] = kl.detach()
        log.record(stats)
        return loss


def check_group_settings(settings, name: str) -> None:
    """The settings of a stage whose baseline is a group of answers (GRPO, RLOO)."""
    if settings.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"{name}.kl_estimator must be 'k1' or 'k3', got {settings.kl_estimator!r}")
    if settings.group_size < 2:
        raise ValueError(f"{name}.group_size must be >= 2 (the group is the baseline), got {settings.group_size}")


def run_grpo(cfg: Config, run_dir) -> dict:
    """GRPO from ``grpo.init_from`` against ``grpo.reward``; writes ``run_dir/grpo``. Re-running resumes."""
    check_group_settings(cfg.grpo, "grpo")
    return run_rl(cfg, run_dir, "grpo", GRPO(cfg.grpo))
