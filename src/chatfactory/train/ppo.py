"""PPO with a KL penalty to the SFT model: InstructGPT's step 3.

Each iteration (one step of ``ppo.steps``) samples answers to ``rollout_batch`` prompts with the
current policy (train/rollout.py), scores them, and takes ``ppo_epochs x minibatches`` clipped-PPO
optimizer steps on that experience:

* reward per answer token t:  r_t = -beta * (log pi(a_t) - log pi_ref(a_t)), plus the reward model's
  score (minus ``no_end_penalty`` for an answer that never emits ``<|end|>``) at the last real token;
* the critic (initialised from the reward model, as InstructGPT did) predicts values; GAE with
  gamma = 1, lambda = 0.95 turns rewards into advantages, whitened over real answer tokens only;
* loss = clipped-ratio policy loss + vf_coef * clipped value loss (+ ptx_coef * pretraining loss);
* beta is fixed, or adapted toward ``target_kl`` (Ziegler et al. 2019).

The policy, reference, reward model and critic all run with dropout off. With LoRA (train/lora.py) the
policy and the critic's backbone train adapters only, and the reference is the policy with them off.
The shared loop (train/loop.py) does the optimizer steps, checkpoints and resume: one loop step is one minibatch
update, so one iteration is ``ppo_epochs * minibatches`` loop steps, and checkpoints fall on iteration
boundaries (the next rollout is a pure function of the weights and the seed, so resume is exact).
``model.safetensors`` holds the policy (``load_model`` reads it); the critic and beta ride in state.pt.

    chatfactory ppo --config tiny --out runs/NAME ppo.prompts=prompts.jsonl ppo.steps=100
    torchrun --nproc_per_node=2 -m chatfactory.cli ppo --config tiny --out runs/NAME ppo.prompts=…
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import load_model, load_weights, resolve_stage, unique_state_dict
from ..config import Config, RLConfig, save_config
from ..data.preferences import load_prompts
from ..engine import Engine
from ..eval.winrate import gold_score
from ..scorer import load_scorer
from .lora import apply_lora, as_reference, lora_layers, lora_settings, summary
from .loop import Dist, Stage, all_reduce_sum, autocast_for, setup_dist, train
from .rollout import answer_logprobs, attention_mask, forward_answers, logprobs_and_entropy, rollout


# ---------------------------------------------------------------- the math (unit-tested by hand)
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to mean 0 / variance 1 using real tokens only (padding would drag both toward 0);
    padding comes out 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_ref: unbiased for KL(pi || ref) on samples of pi, but any single term can be < 0."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(ratio - 1) - log ratio with ratio = pi_ref / pi: unbiased and never negative (Schulman's k3)."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


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
    """Clipped surrogate, averaged over real tokens -> (loss, stats). Stats: clip fraction, approx-KL
    (the k3 estimate of KL(old || new)) and the mean ratio."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(loss1, loss2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss2 > loss1).float(), mask),
                 "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, vf_clip: float):
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped kept within vf_clip of the rollout's values."""
    clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        frac = masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask)
    return loss, {"vf_clipfrac": frac}


def adapt_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Ziegler et al.'s proportional controller: move beta by up to 20% * n/horizon toward the target."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return kl_coef * (1.0 + error * n / horizon)


# ---------------------------------------------------------------- models
def no_dropout(model: nn.Module) -> nn.Module:
    """RL needs the sampling policy and the trained one to be the same function: dropout off."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "cfg") and hasattr(m.cfg, "dropout"):
            m.cfg.dropout = 0.0
    return model


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return no_dropout(model).eval()


class ActorCritic(nn.Module):
    """The trained networks as one module (one optimizer, one DDP wrapper): the policy GPT and an
    optional critic with ``values(idx, positions, attn_mask) -> (B, T)`` (a RewardModel)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.policy, self.critic = no_dropout(policy), (no_dropout(critic) if critic is not None else None)

    def forward(self, batch: dict, ptx=None, policy: bool = True) -> dict:
        """-> {"logits": (B, A, V) predicting the answer tokens (None if not ``policy``), "values": (B, A)
        or None, "ptx_loss": next-token loss on ``ptx = (x, y)`` or None}."""
        out = {"logits": forward_answers(self.policy, batch) if policy else None, "values": None, "ptx_loss": None}
        if self.critic is not None:
            # V(state before each answer token), aligned with the logits; the last column is not needed
            v = self.critic.values(batch["tokens"][:, :-1], positions=batch["positions"][:, :-1],
                                   attn_mask=attention_mask(batch["valid"][:, :-1]))
            out["values"] = v[:, batch["start"] - 1:]
        if ptx is not None:
            out["ptx_loss"] = self.policy(ptx[0], targets=ptx[1])
        return out


class Reward:
    """What scores a rollout: a reward model (read at the last real token), a scorer function of the
    prompt row and the decoded answer, or zero."""

    def __init__(self, spec: str, run_dir, tok, device):
        self.spec, self.tok, self.model, self.fn = spec, tok, None, None
        if spec == "zero":
            pass
        elif ":" in spec and not Path(spec).exists():
            self.fn = load_scorer(spec)
        else:
            from .reward import load_reward_model

            self.dir = resolve_stage(run_dir, spec, "reward")
            self.model = frozen(load_reward_model(self.dir, device))

    @torch.no_grad()
    def __call__(self, batch: dict, rows: list[dict]) -> torch.Tensor:
        dev = batch["tokens"].device
        if self.model is not None:
            return self.model.score(batch["tokens"], batch["last"], positions=batch["positions"],
                                    attn_mask=attention_mask(batch["valid"])).float()
        if self.fn is None:
            return torch.zeros(len(rows), device=dev)
        scores = []
        for r, text in zip(rows, self.answer_texts(batch)):
            s = self.fn(r, text)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"scorer {self.spec!r} returned {s!r} (expected a finite number) for prompt {r['messages']!r}")
            scores.append(float(s))
        return torch.tensor(scores, device=dev)

    def answer_texts(self, batch: dict) -> list[str]:
        """Each row's answer as text (``<|end|>`` dropped); answers are right-padded, so a row's real
        tokens are its first ``answer_mask.sum()`` (one transfer for the batch, not one per row)."""
        ids = batch["tokens"][:, batch["start"]:].tolist()
        lengths = batch["answer_mask"].sum(1).tolist()
        return [self.tok.decode([t for t in row[:n] if t != self.tok.end_id]) for row, n in zip(ids, lengths)]


# ---------------------------------------------------------------- the stage
class RLStage(Stage):
    """What PPO and GRPO share: prompt scheduling, rollouts, minibatching, logging, checkpoint hooks.
    Subclasses say how experience turns into advantages (``advantages``) and what the loss is."""

    name = "rl"
    fsdp_unsupported = ("each rank samples its rollouts on its own, a different number of forward passes per "
                        "rank, which FSDP2's per-forward all-gathers cannot follow; and its checkpoint holds "
                        "a critic and beta beside the policy")

    def __init__(self, tc: RLConfig, tok, rows: list[dict], ac: ActorCritic, ref, reward: Reward,
                 model_config: dict, eval_rows=None, gold=None, ptx=None):
        self.tc, self.tok, self.rows, self.ac, self.ref, self.reward = tc, tok, rows, ac, ref, reward
        self.model_config, self.eval_rows, self.gold, self.ptx = model_config, eval_rows or [], gold, ptx
        self.updates_per_iter = tc.ppo_epochs * tc.minibatches
        n = self.rollout_rows()
        if n % (tc.minibatches * tc.grad_accum):
            raise ValueError(f"{self.name}: {n} rollout answers do not split into minibatches={tc.minibatches} "
                             f"x grad_accum={tc.grad_accum}")
        if not rows:
            raise ValueError(f"{self.name}: no prompts to train on")
        # a prompt must leave room for the answer in the context; the oldest tokens go first
        room = ac.policy.cfg.block_size - tc.max_new_tokens
        if room < 2:
            raise ValueError(f"{self.name}.max_new_tokens={tc.max_new_tokens} leaves no room for a prompt "
                             f"in block_size={ac.policy.cfg.block_size}")
        self.prompt_ids = [tok.chat_prompt(r["messages"])[-room:] for r in rows]
        if tc.compile_rollout and lora_layers(ac.policy):
            raise ValueError(f"{self.name}.compile_rollout=true cannot sample a LoRA policy: the compiled decode step reads "
                             f"each linear's weight and would skip the adapters (set {self.name}.compile_rollout=false)")
        training = ac.policy.training
        self.engine = Engine(ac.policy, compile=tc.compile_rollout, vocab_limit=tok.vocab_size)  # one for every rollout: compiled once
        ac.policy.train(training)
        self.kl_coef = tc.kl_coef
        self.buffer, self.buffer_iter, self.iter_stats, self.update_stats = None, -1, {}, []
        self._perm_epoch, self._perm = -1, None

    # ---- what subclasses define
    def rollout_rows(self) -> int:
        return self.tc.rollout_batch

    def advantages(self, exp: dict, score: torch.Tensor) -> dict:
        raise NotImplementedError

    def needs_old_logp(self) -> bool:
        """The sampling policy's log-probs need a forward pass of their own only if several updates
        share a rollout (later ones need the ratio to the old policy); with one update they are the
        live log-probs, detached, and the pass is skipped (TRL does the same)."""
        return self.updates_per_iter > 1

    # ---- prompts: a pure function of (iteration, rank), so resume is exact
    def _index(self, k: int) -> int:
        epoch, j = divmod(k, len(self.rows))
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.tc.seed * 1_000_003 + epoch)
            self._perm_epoch, self._perm = epoch, torch.randperm(len(self.rows), generator=g)
        return int(self._perm[j])

    def prompts_for(self, it: int, rank: int, world: int) -> list[int]:
        n = self.tc.rollout_batch
        first = (it * world + rank) * n
        return [self._index(k) for k in range(first, first + n)]

    # ---- experience
    @torch.no_grad()
    def make_experience(self, it: int, rank: int, world: int) -> dict:
        tc = self.tc
        picks = self.prompts_for(it, rank, world)
        group = self.rollout_rows() // len(picks)
        picks = [i for i in picks for _ in range(group)]
        rows = [self.rows[i] for i in picks]
        seed = (tc.seed * 1_000_003 + it * 7919 + rank * 104_729) % (2**31)
        t0 = time.perf_counter()
        batch = rollout(self.ac.policy, [self.prompt_ids[i] for i in picks], tc.max_new_tokens, tc.temperature,
                        self.tok.end_id, self.tok.pad_id, seed, self.engine)
        batch["group"] = group  # rows i*group … (i+1)*group-1 share a prompt: it runs once per group
        mask = batch["answer_mask"].float()
        t1 = time.perf_counter()
        # old log-probs (and values) in the minibatch shapes the updates will use
        mbs = len(rows) // (tc.minibatches * tc.grad_accum)
        need_old = self.needs_old_logp()
        old_logp, values, ent, ref_logp = [], [], [], []
        # the same autocast as the loss (bf16 on CUDA), so the first ratio is 1 there too
        amp = autocast_for(Dist(device=mask.device), tc.dtype)
        for i in range(0, len(rows), mbs):
            chunk = select(batch, torch.arange(i, min(i + mbs, len(rows)), device=mask.device))
            with amp:
                self._score_chunk(chunk, need_old, old_logp, ent, values, ref_logp)
        if old_logp:
            batch["old_logp"] = torch.cat(old_logp) * mask
        if ref_logp:
            batch["ref_logp"] = torch.cat(ref_logp) * mask
        elif old_logp:
            batch["ref_logp"] = batch["old_logp"].clone()
        if values:
            batch["old_values"] = torch.cat(values) * mask
        score = self.reward(batch, rows)
        ended = batch["ended"].float()
        penalised = score - tc.no_end_penalty * (1 - ended)
        batch.update(self.advantages(batch, penalised))
        _sync(mask.device)
        t2 = time.perf_counter()
        self.iter_stats = {"score": score.mean(), "answer_len": mask.sum(1).mean(), "end_rate": ended.mean(),
                           "reward": batch.pop("seq_reward").mean()}
        if old_logp:  # else the loss logs them from its own forward pass
            kl = kl_k1(batch["old_logp"], batch["ref_logp"]) * mask
            self.iter_stats.update(kl=kl.sum(1).mean(), entropy=masked_mean(torch.cat(ent), mask))
        # where the time goes: sampling vs. scoring (policy, reference, critic, reward); updates are the rest
        self.iter_stats.update(t_rollout=torch.tensor(t1 - t0), t_score=torch.tensor(t2 - t1))
        return batch

    def _score_chunk(self, chunk, need_old, old_logp, ent, values, ref_logp) -> None:
        """Old log-probs and entropy (policy), values (critic), reference log-probs of one chunk."""
        T = self.tc.temperature
        if need_old or self.ac.critic is not None:
            out = self.ac(chunk, policy=need_old)
            if need_old:
                lp, e = logprobs_and_entropy(out["logits"], chunk["tokens"], chunk["start"], T)
                old_logp.append(lp)
                ent.append(e)
            if out["values"] is not None:
                values.append(out["values"].float())
        if self.ref is not None:
            with as_reference(self.ref):  # a LoRA policy: its base, adapters off
                ref_logp.append(answer_logprobs(forward_answers(self.ref, chunk), chunk["tokens"], chunk["start"], T))

    # ---- the loop's interface
    def micro_batch(self, step, micro, rank, world):
        tc = self.tc
        it, u = divmod(step, self.updates_per_iter)
        if self.buffer_iter != it:
            self.buffer, self.buffer_iter = self.make_experience(it, rank, world), it
            self._after_experience()
        epoch, mb = divmod(u, tc.minibatches)
        n = self.rollout_rows()
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + it * 101 + epoch)
        # epoch 0 keeps rollout order, so its minibatches are the chunks the old log-probs came from
        order = torch.randperm(n, generator=g) if epoch > 0 else torch.arange(n)
        mbs = n // tc.minibatches
        size = mbs // tc.grad_accum
        idx = order[mb * mbs + micro * size: mb * mbs + (micro + 1) * size].to(self.buffer["tokens"].device)
        batch = select(self.buffer, idx)
        if self.ptx is not None:
            batch["ptx"] = self.ptx.micro_batch(step, micro, tc.grad_accum, tc.batch_size, rank, world)
        return batch

    def _after_experience(self) -> None:
        pass

    def tokens(self, batch):
        return int(batch["valid"].sum())

    def record(self, stats: dict) -> None:
        self.update_stats.append({k: float(v) for k, v in stats.items()})

    def evaluate(self, model, d: Dist) -> dict:
        tc = self.tc
        names = sorted(self.update_stats[0]) if self.update_stats else []
        upd = [sum(s[k] for s in self.update_stats) / len(self.update_stats) for k in names]
        keys = list(self.iter_stats) + names
        vals = torch.tensor([float(v) for v in self.iter_stats.values()] + upd, dtype=torch.float64, device=d.device)
        vals = all_reduce_sum(vals) / d.world
        res = {k: round(v, 6) for k, v in zip(keys, vals.tolist())}
        res["kl_coef"] = self.kl_coef
        it = self.buffer_iter + 1
        res["iteration"] = it
        if self.eval_rows and self.gold is not None and (it % max(1, tc.eval_every) == 0 or it == tc.steps):
            mine = self.eval_rows[: tc.eval_rows][d.rank:: d.world]
            g = gold_score(self.ac.policy, self.tok, mine, self.gold, tc.max_new_tokens, tc.temperature, seed=tc.seed)
            tot = all_reduce_sum(torch.tensor([g * len(mine), len(mine)], dtype=torch.float64, device=d.device))
            res["gold"] = (tot[0] / tot[1].clamp(min=1)).item()
        self.update_stats = []
        return res

    # ---- checkpoint hooks: the policy in model.safetensors, the critic and beta in state.pt
    def checkpoint_weights(self, model):
        extra = {"kl_coef": float(self.kl_coef)}
        if model.critic is not None:
            extra["critic"] = {k: v.detach().clone() for k, v in model.critic.state_dict().items()}
        return unique_state_dict(model.policy), extra

    def restore_weights(self, model, weights, state, where):
        load_weights(model.policy, weights, where)
        if model.critic is not None:
            if "critic" not in state:
                raise ValueError(f"{where}: the resume state holds no critic weights")
            dev = next(model.critic.parameters()).device
            model.critic.load_state_dict({k: v.to(dev) for k, v in state["critic"].items()})
        self.kl_coef = float(state.get("kl_coef", self.kl_coef))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def select(batch: dict, idx: torch.Tensor) -> dict:
    """Rows ``idx`` of every per-row tensor of a rollout batch (the padding width is kept). Rows that
    share a prompt stay marked as groups (``group``, see rollout.forward_answers) only if ``idx`` takes
    whole groups, each in order."""
    out = {k: (v[idx] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == len(batch["tokens"]) else v)
           for k, v in batch.items()}
    g = batch.get("group", 1)
    if g > 1 and not _whole_groups(idx, g):
        out["group"] = 1
    return out


def _whole_groups(idx: torch.Tensor, g: int) -> bool:
    """``idx`` lists whole groups of ``g`` rows (rows k*g … k*g+g-1), each in order."""
    if len(idx) % g:
        return False
    rows = idx.view(-1, g)
    return bool(((rows[:, :1] % g == 0) & (rows == rows[:, :1] + torch.arange(g, device=idx.device))).all())


class PPOStage(RLStage):
    name = "ppo"

    def advantages(self, exp, score):
        tc = self.tc
        mask = exp["answer_mask"].float()
        kl = kl_k1(exp["old_logp"], exp["ref_logp"])
        rewards = token_rewards(score, kl, mask, self.kl_coef)
        adv, returns = gae(rewards, exp["old_values"], mask, tc.gamma, tc.lam)
        return {"advantages": masked_whiten(adv, mask), "returns": returns, "seq_reward": rewards.sum(1)}

    def needs_old_logp(self):
        return True  # the KL penalty in the rewards is measured on the sampling policy

    def _after_experience(self):
        tc = self.tc
        if tc.adaptive_kl:
            kl = float(all_reduce_sum(self.iter_stats["kl"].detach().double().clone()))
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            self.kl_coef = adapt_kl_coef(self.kl_coef, kl / world, tc.target_kl, tc.kl_horizon,
                                         self.rollout_rows() * world)

    def loss(self, model, batch):
        tc = self.tc
        mask = batch["answer_mask"].float()
        out = model(batch, batch.get("ptx"))
        logp = answer_logprobs(out["logits"], batch["tokens"], batch["start"], tc.temperature)
        pg, stats = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, tc.clip)
        vf, vstats = value_loss(out["values"], batch["old_values"], batch["returns"], mask, tc.vf_clip)
        loss = pg + tc.vf_coef * vf
        stats.update(vstats, pg_loss=pg.detach(), value_loss=vf.detach())
        if out["ptx_loss"] is not None:
            loss = loss + tc.ptx_coef * out["ptx_loss"]
            stats["ptx_loss"] = out["ptx_loss"].detach()
        self.record(stats)
        return loss


# ---------------------------------------------------------------- building a run
def build_rl(cfg: Config, tc: RLConfig, run_dir: Path, d: Dist, name: str, with_critic: bool, lora: dict | None = None):
    """Everything the RL stages load: tokenizer, prompts, policy, reference, reward, critic, gold. With
    ``lora`` settings the policy and the critic's backbone train adapters only (the critic's head whole),
    and the reference is the policy itself with its adapters off, unless ``ref_from`` names another."""
    from .reward import RewardModel, load_reward_model, run_tokenizer

    init = resolve_stage(run_dir, tc.init_from, f"{name}.init_from")
    if d.main:  # may copy the tokenizer of the run the policy comes from: one writer
        run_tokenizer(run_dir, init)
    if d.world > 1:
        torch.distributed.barrier()
    tok = run_tokenizer(run_dir, init)
    if not tc.prompts:
        raise ValueError(f"{name}.prompts is not set: give a prompts JSONL ({{\"messages\": [... user turn]}})")
    rows = load_prompts(tc.prompts)
    policy, info = load_model(init, d.device)
    model_config = info["model"]
    ref = None
    if tc.kl_coef > 0 or (with_critic and getattr(tc, "adaptive_kl", False)):
        ref_dir = resolve_stage(run_dir, tc.ref_from, f"{name}.ref_from") if tc.ref_from else init
        ref = policy if lora and not tc.ref_from else frozen(load_model(ref_dir, d.device)[0])
    reward = Reward(tc.reward, run_dir, tok, d.device)
    critic = None
    if with_critic:
        src = getattr(tc, "critic_from", "")
        if not src and reward.model is not None:
            critic = copy.deepcopy(reward.model).train()
        else:
            src_dir = resolve_stage(run_dir, src or tc.init_from, f"{name}.critic_from")
            if json.loads((src_dir / "config.json").read_text()).get("kind") == "reward":
                critic = load_reward_model(src_dir, d.device).train()
            else:  # a fresh head on a copy of a backbone; zero, so the first advantages are the rewards alone
                critic = RewardModel(load_model(src_dir, d.device)[0]).to(d.device)
                nn.init.zeros_(critic.head.weight)
        for p in critic.parameters():
            p.requires_grad_(True)
    ac = ActorCritic(policy, critic)
    for p in ac.policy.parameters():
        p.requires_grad_(True)
    if lora:
        apply_lora(ac.policy, lora, tc.seed)
        if critic is not None:
            apply_lora(critic.backbone, lora, tc.seed + 1)
    eval_rows = load_prompts(tc.eval_prompts) if tc.eval_prompts else []
    gold = load_scorer(tc.gold) if tc.gold else None
    ptx = None
    if getattr(tc, "ptx_coef", 0.0) > 0:
        from ..data.shards import PretrainBatches, open_split

        ptx = PretrainBatches(open_split(run_dir / "data", "train"), min(tc.seq_len, policy.cfg.block_size), tc.seed)
    return tok, rows, ac, ref, reward, model_config, eval_rows, gold, ptx, init


def loop_config(tc: RLConfig, updates: int):
    """The loop counts optimizer steps; RL configs count iterations of ``updates`` steps each."""
    return dataclasses.replace(tc, steps=tc.steps * updates, warmup_steps=tc.warmup_steps * updates,
                               eval_every=updates, ckpt_every=tc.ckpt_every * updates)


def run_rl(cfg: Config, run_dir, name: str, stage_cls, with_critic: bool) -> dict:
    run_dir = Path(run_dir)
    tc = getattr(cfg, name)
    lora = lora_settings(cfg, name)
    d = setup_dist(tc.device)
    if d.main and not (run_dir / "config.yaml").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    tok, rows, ac, ref, reward, model_config, eval_rows, gold, ptx, init = build_rl(cfg, tc, run_dir, d, name, with_critic, lora)
    stage = stage_cls(tc, tok, rows, ac, ref, reward, model_config, eval_rows, gold, ptx)
    if lora:
        stage.info = {"lora": lora}
    if d.main:
        what = f"reward model {reward.dir}" if reward.model is not None else f"reward {tc.reward}"
        print(f"{name}: {len(rows):,} prompts, {tc.steps} iterations of {stage.rollout_rows()} answers x "
              f"{stage.updates_per_iter} updates; policy from {init}; {what}; beta={tc.kl_coef}"
              + (f"; {summary(ac)}" if lora else ""))
    result = train(stage, ac, loop_config(tc, stage.updates_per_iter), run_dir / name, d)
    if d.world > 1:
        torch.distributed.destroy_process_group()
    return result


def run_ppo(cfg: Config, run_dir) -> dict:
    """PPO from ``ppo.init_from`` against ``ppo.reward``; writes ``run_dir/ppo``. Re-running resumes."""
    return run_rl(cfg, run_dir, "ppo", PPOStage, with_critic=True)
