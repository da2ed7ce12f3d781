"""PPO with a KL penalty to the SFT model: InstructGPT's step 3.

An iteration (one step of ``ppo.steps``; train/rl.py ``train_rl``) samples answers to
``rollout_batch`` prompts with the current policy, scores them, turns the scores into advantages and
takes ``ppo_epochs x minibatches`` clipped-PPO optimizer steps on that experience. What is PPO's own:

* reward per answer token t:  r_t = -beta * (log pi(a_t) - log pi_ref(a_t)), plus the reward model's
  score (minus ``no_end_penalty`` for an answer that never emits ``<|end|>``) at the last real token;
* the critic (initialised from the reward model, as InstructGPT did) predicts values; GAE with
  gamma = 1, lambda = 0.95 turns rewards into advantages, whitened over the real answer tokens of the
  whole rollout (every rank's);
* loss = clipped-ratio policy loss + vf_coef * clipped value loss (+ ptx_coef * pretraining loss);
* beta is fixed, or adapted toward ``target_kl`` after each rollout (Ziegler et al. 2019).

The policy, reference, reward model and critic all run with dropout off. With LoRA (model/lora.py) the
policy and the critic's backbone train adapters only, and the reference is the policy with them off.
``model.safetensors`` holds the policy (``load_model`` reads it); the critic and beta ride in state.pt.

    chatfactory ppo --config tiny --out runs/NAME ppo.prompts=prompts.jsonl ppo.steps=100
    torchrun --nproc_per_node=2 -m chatfactory.cli ppo --config tiny --out runs/NAME ppo.prompts=…
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..config import Config
from ..store.checkpoint import resolve_stage, stage_config
from ..store.load import load_model
from .loop import all_reduce_sum
from .reward import RewardModel, load_reward_model
from .rl import run_rl
from .rl_loss import aggregate, kl_k1, masked_mean
from .rollout import answer_logprobs


# ---------------------------------------------------------------- the math (unit-tested by hand)
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to mean 0 / variance 1 over the real tokens of every rank's rollout (padding would drag
    both toward 0; a batch split over ranks whitens as it would whole); padding comes out 0."""
    m = mask.to(x.dtype)
    total, count = all_reduce_sum(torch.stack([(x * m).sum(), m.sum()]))
    mean = total / count.clamp(min=1)
    var = all_reduce_sum(((x - mean) ** 2 * m).sum()) / count.clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * kl on every real answer token, plus ``score`` (B,) on each row's last real token."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(score), device=score.device), last] += score.to(rewards.dtype) * (mask.sum(1) > 0)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over right-padded answers -> (advantages, returns), (B, A).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 past the last real token (the episode ended);
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V. Both are 0 on padding."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    A = rewards.size(1)
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(A)):
        next_v = values[:, t + 1] if t + 1 < A else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    adv = adv * mask
    return adv, (adv + values) * mask


def policy_loss(logp, old_logp, adv, mask, clip: float):
    """Clipped surrogate per token -> ((B, A) losses, stats over the real tokens): clip fraction,
    approx-KL (the k3 estimate of KL(old || new)) and the mean ratio."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1 - clip, 1 + clip)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss2 > loss1).float(), mask),
                 "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
                 "ratio": masked_mean(ratio, mask)}
    return torch.maximum(loss1, loss2), stats


def value_loss(values, old_values, returns, mask, vf_clip: float):
    """0.5 * max((V - R)^2, (V_clipped - R)^2) per token, V_clipped kept within vf_clip of the rollout's
    values -> ((B, A) losses, stats over the real tokens)."""
    clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    with torch.no_grad():
        frac = masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), {"vf_clipfrac": frac}


def adapt_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Ziegler et al.'s proportional controller: move beta by up to 20% * n/horizon toward the target."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return kl_coef * (1.0 + error * n / horizon)


class PPO:
    """PPO's part of an RL stage (train/rl.py runs the iteration): the critic, GAE advantages of the
    KL-shaped token rewards, the clipped policy + value loss (+ ptx), and beta's controller."""

    group = 1  # one answer per prompt
    needs_old_logp = True  # the KL penalty in the rewards is measured on the sampling policy

    def __init__(self, settings):
        self.settings, self.kl_coef = settings, settings.kl_coef

    def make_critic(self, run_dir, reward, device) -> nn.Module:
        """The value network: the reward model itself (InstructGPT), a reward-model stage, or a fresh zero
        head on a copy of another stage's backbone (so the first advantages are the rewards alone)."""
        s = self.settings
        if not s.critic_from and reward.model is not None:
            return copy.deepcopy(reward.model).train().requires_grad_(True)
        src_dir = resolve_stage(run_dir, s.critic_from or s.init_from, "ppo.critic_from")
        if stage_config(src_dir).get("kind") == "reward":
            return load_reward_model(src_dir, device).train().requires_grad_(True)
        critic = RewardModel(load_model(src_dir, device)[0]).to(device)
        nn.init.zeros_(critic.head.weight)
        return critic.requires_grad_(True)

    def advantages(self, exp: dict, log) -> dict:
        """-> {"advantages" (whitened over every rank's real answer tokens), "returns"}; logs the reward and,
        with ``adaptive_kl``, moves beta for the next rollout by this one's KL (the mean over ranks)."""
        s, mask = self.settings, exp["answer_mask"].float()
        kl = kl_k1(exp["old_logp"], exp["ref_logp"])
        rewards = token_rewards(exp["score"], kl, mask, self.kl_coef)
        adv, returns = gae(rewards, exp["old_values"], mask, s.gamma, s.lam)
        log.rollout["reward"] = rewards.sum(1).mean()
        if s.adaptive_kl:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            kl_now = float(all_reduce_sum(log.rollout["kl"].detach().double().clone())) / world
            self.kl_coef = adapt_kl_coef(self.kl_coef, kl_now, s.target_kl, s.kl_horizon, s.rollout_batch * world)
        return {"advantages": masked_whiten(adv, mask), "returns": returns}

    def loss(self, model, batch: dict, log) -> torch.Tensor:
        s = self.settings
        mask = batch["answer_mask"].float()
        out = model(batch, batch.get("ptx"))
        logp = answer_logprobs(out["logits"], batch["tokens"], batch["start"], s.temperature)
        pg, stats = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, s.clip)
        vf, vstats = value_loss(out["values"], batch["old_values"], batch["returns"], mask, s.vf_clip)
        pg, vf = aggregate(pg, batch), aggregate(vf, batch)  # both over the minibatch, by loss_agg
        loss = pg + s.vf_coef * vf
        stats.update(vstats, pg_loss=pg.detach(), value_loss=vf.detach())
        if out["ptx_loss"] is not None:
            loss = loss + s.ptx_coef * out["ptx_loss"]
            stats["ptx_loss"] = out["ptx_loss"].detach()
        log.record(stats)
        return loss


def run_ppo(cfg: Config, run_dir) -> dict:
    """PPO from ``ppo.init_from`` against ``ppo.reward``; writes ``run_dir/ppo``. Re-running resumes."""
    return run_rl(cfg, run_dir, "ppo", PPO(cfg.ppo))
