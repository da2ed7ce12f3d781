"""What every RL stage shares: PPO (train/ppo.py), GRPO (train/grpo.py) and RLOO (train/rloo.py) hold
only their algorithm; the iteration, the scorer, the trained networks and the run are here.

One iteration (one step of ``<stage>.steps``) reads top to bottom in ``RLStage.iteration``:

    exp, rows = self.sample(it, rank, world)       # 1. answers to this iteration's prompts from the policy
    self.score(exp, rows)                          # 2. log-probs (policy, reference), values, the reward
    exp.update(self.advantages(exp))               # 3. the algorithm: GAE (PPO), a group baseline (GRPO, RLOO)
    yield from self.updates(exp, it, rank, world)  # 4. ppo_epochs x minibatches updates, in micro-batches
                                                   # 5. the loop logs evaluate(): the iteration's statistics

The shared loop (train/loop.py) stays the one place for the optimizer, schedule, gradient accumulation,
checkpoints and logging. It asks a stage for micro-batches; an RL stage hands out those of the running
iteration (``micro_batch`` starts one at every iteration's first loop step). One loop step is one
minibatch update, so an iteration is ``ppo_epochs * minibatches`` steps, its evaluation is logged when
they are done, and checkpoints fall on iteration boundaries: the next rollout is a pure function of the
weights and the seed, so a resumed run is exact.

Also here: the loss aggregation (``loss_agg``), the scorer wrapper (``Reward``), the trained networks as
one module (``ActorCritic``), ``no_dropout``/``frozen``, and building and running a stage (``run_rl``).
The rollout batch itself, its row selection and the rollout/training log-prob check: train/rollout.py.

    chatfactory ppo --config tiny --out runs/NAME ppo.prompts=prompts.jsonl      # (or grpo, rloo)
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Config, RLConfig, save_config
from ..data.preferences import load_prompts
from ..data.scorer import load_scorer
from ..eval.winrate import gold_score
from ..inference.engine import Engine
from ..model.lora import apply_lora, as_reference, lora_layers, lora_settings, summary
from ..store.checkpoint import load_weights, resolve_stage, unique_state_dict
from ..store.load import load_model
from .loop import Dist, Stage, all_reduce_sum, autocast_for, setup_dist, train
from .pairs import run_tokenizer
from .reward import load_reward_model
from .rollout import (
    LogpMismatch,
    answer_logprobs,
    attention_mask,
    forward_answers,
    logprobs_and_entropy,
    rollout,
    select,
)
from .selection import BestIteration, finish_with_best


# ---------------------------------------------------------------- shared math
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


# ---------------------------------------------------------------- models
def no_dropout(model: nn.Module) -> nn.Module:
    """Dropout off, for good: RL needs the sampling policy and the trained one to be the same function,
    and DPO the policy and its reference."""
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
    """The iteration and everything around it. A subclass gives ``advantages`` (experience -> the
    per-token advantages its ``loss`` reads) and ``loss``; ``make_critic`` if it trains a value head."""

    name = "rl"
    fsdp_unsupported = ("each rank samples its rollouts on its own, a different number of forward passes per "
                        "rank, which FSDP2's per-forward all-gathers cannot follow; and its checkpoint holds "
                        "a critic and beta beside the policy")

    def __init__(self, settings: RLConfig, tok, rows: list[dict], ac: ActorCritic, ref, reward: Reward,
                 model_config: dict, eval_rows=None, gold=None, ptx=None):
        self.settings, self.tok, self.rows, self.ac, self.ref, self.reward = settings, tok, rows, ac, ref, reward
        self.model_config, self.eval_rows, self.gold, self.ptx = model_config, eval_rows or [], gold, ptx
        self.updates_per_iter = settings.ppo_epochs * settings.minibatches
        if settings.loss_agg not in AGGREGATIONS:
            raise ValueError(f"{self.name}.loss_agg must be one of {', '.join(AGGREGATIONS)}, got {settings.loss_agg!r}")
        n = self.rollout_rows()
        if n % (settings.minibatches * settings.grad_accum):
            raise ValueError(f"{self.name}: {n} rollout answers do not split into minibatches={settings.minibatches} "
                             f"x grad_accum={settings.grad_accum}")
        if not rows:
            raise ValueError(f"{self.name}: no prompts to train on")
        # a prompt must leave room for the answer in the context; the oldest tokens go first
        room = ac.policy.cfg.block_size - settings.max_new_tokens
        if room < 2:
            raise ValueError(f"{self.name}.max_new_tokens={settings.max_new_tokens} leaves no room for a prompt "
                             f"in block_size={ac.policy.cfg.block_size}")
        self.prompt_ids = [tok.chat_prompt(r["messages"])[-room:] for r in rows]
        if settings.compile_rollout and lora_layers(ac.policy):
            raise ValueError(f"{self.name}.compile_rollout=true cannot sample a LoRA policy: the compiled decode step reads "
                             f"each linear's weight and would skip the adapters (set {self.name}.compile_rollout=false)")
        training = ac.policy.training
        self.engine = Engine(ac.policy, compile=settings.compile_rollout, vocab_limit=tok.vocab_size)  # one for every rollout: compiled once
        ac.policy.train(training)
        self.kl_coef = settings.kl_coef
        self.experience, self.it, self.running = None, -1, None  # the running iteration: its experience, number, generator
        self.iter_stats, self.update_stats = {}, []
        self.mismatch, self.mismatch_warned = LogpMismatch(), False
        self.selection = BestIteration.for_stage(self.name, settings, self.eval_rows, gold)  # None unless keep_best
        self.finishes_itself = self.selection is not None  # finish_with_best writes the finished mark
        self._perm_epoch, self._perm = -1, None

    # ---- what subclasses define
    @staticmethod
    def make_critic(settings, run_dir: Path, reward: Reward, device) -> nn.Module | None:
        """The value network the algorithm trains beside the policy (PPO); None: no critic."""
        return None

    def rollout_rows(self) -> int:
        return self.settings.rollout_batch

    def advantages(self, exp: dict) -> dict:
        """-> {"advantages": (B, A), and whatever else ``loss`` reads}; logs ``reward`` in iter_stats."""
        raise NotImplementedError

    def needs_old_logp(self) -> bool:
        """The sampling policy's log-probs need a forward pass of their own only if several updates
        share a rollout (later ones need the ratio to the old policy); with one update they are the
        live log-probs, detached, and the pass is skipped (TRL does the same)."""
        return self.updates_per_iter > 1

    # ---- one iteration
    def iteration(self, it: int, rank: int, world: int):
        """Iteration ``it``, top to bottom; yields the micro-batches of its updates to the loop."""
        t0 = time.perf_counter()
        exp, rows = self.sample(it, rank, world)  # 1. the current policy answers this iteration's prompts
        t1 = time.perf_counter()
        self.score(exp, rows)  # 2. what the policy, the reference, the critic and the reward make of them
        exp.update(self.advantages(exp))  # 3. the algorithm's advantages
        _sync(exp["tokens"].device)
        self.iter_stats.update(t_rollout=torch.tensor(t1 - t0), t_score=torch.tensor(time.perf_counter() - t1))
        self.experience, self.it = exp, it
        yield from self.updates(exp, it, rank, world)  # 4. K epochs of minibatch updates; 5. the loop logs

    def micro_batch(self, step, micro, rank, world):
        """The loop's interface: the next micro-batch of the running iteration (a new one starts at its
        first step; a resumed run starts on one, as checkpoints fall between iterations)."""
        it, update = divmod(step, self.updates_per_iter)
        if update == 0 and micro == 0:
            self.running = self.iteration(it, rank, world)
        return next(self.running)

    # prompts: a pure function of (iteration, rank), so resume is exact
    def _index(self, k: int) -> int:
        epoch, j = divmod(k, len(self.rows))
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + epoch)
            self._perm_epoch, self._perm = epoch, torch.randperm(len(self.rows), generator=g)
        return int(self._perm[j])

    def prompts_for(self, it: int, rank: int, world: int) -> list[int]:
        n = self.settings.rollout_batch
        first = (it * world + rank) * n
        return [self._index(k) for k in range(first, first + n)]

    @torch.no_grad()
    def sample(self, it: int, rank: int, world: int) -> tuple[dict, list[dict]]:
        """-> (the rollout batch, train/rollout.py; the prompt row of each answer). Rows that share a
        prompt (GRPO's groups) are contiguous: ``exp["group"]`` of them."""
        picks = self.prompts_for(it, rank, world)
        group = self.rollout_rows() // len(picks)
        picks = [i for i in picks for _ in range(group)]
        s = self.settings
        seed = (s.seed * 1_000_003 + it * 7919 + rank * 104_729) % (2**31)
        exp = rollout(self.ac.policy, [self.prompt_ids[i] for i in picks], s.max_new_tokens, s.temperature,
                      self.tok.end_id, self.tok.pad_id, seed, self.engine)
        exp["group"] = group  # the prompt runs once per group in the forward passes
        return exp, [self.rows[i] for i in picks]

    @torch.no_grad()
    def score(self, exp: dict, rows: list[dict]) -> None:
        """Adds to ``exp``: the sampling policy's log-probs (``old_logp``, if needed), the reference's
        (``ref_logp``), the critic's values (``old_values``) and the ``score`` (minus ``no_end_penalty``
        for an answer that never ended); the old log-probs are checked against the rollout's."""
        s = self.settings
        mask = exp["answer_mask"].float()
        # in the micro-batches the updates will use, under the loss's autocast (bf16 on CUDA), so the
        # first update's ratio is exactly 1
        size = len(rows) // (s.minibatches * s.grad_accum)
        need_old = self.needs_old_logp()
        old_logp, values, ent, ref_logp = [], [], [], []
        amp = autocast_for(Dist(device=mask.device), s.dtype)
        for i in range(0, len(rows), size):
            chunk = select(exp, torch.arange(i, min(i + size, len(rows)), device=mask.device))
            with amp:
                self._score_chunk(chunk, need_old, old_logp, ent, values, ref_logp)
        if old_logp:
            exp["old_logp"] = torch.cat(old_logp) * mask
            self.mismatch.add(exp["old_logp"], exp)  # else the loss measures it on its own forward pass
        if ref_logp:
            exp["ref_logp"] = torch.cat(ref_logp) * mask
        elif old_logp:
            exp["ref_logp"] = exp["old_logp"].clone()
        if values:
            exp["old_values"] = torch.cat(values) * mask
        raw = self.reward(exp, rows)
        ended = exp["ended"].float()
        exp["score"] = raw - s.no_end_penalty * (1 - ended)
        self.iter_stats = {"score": raw.mean(), "answer_len": mask.sum(1).mean(), "end_rate": ended.mean()}
        if old_logp:  # else the loss logs them from its own forward pass
            kl = kl_k1(exp["old_logp"], exp["ref_logp"]) * mask
            self.iter_stats.update(kl=kl.sum(1).mean(), entropy=masked_mean(torch.cat(ent), mask))

    def _score_chunk(self, chunk, need_old, old_logp, ent, values, ref_logp) -> None:
        """Old log-probs and entropy (policy), values (critic), reference log-probs of one chunk."""
        T = self.settings.temperature
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

    def updates(self, exp: dict, it: int, rank: int, world: int):
        """The micro-batches of the iteration's ``ppo_epochs x minibatches`` updates, in the loop's order:
        each epoch cuts a shuffle of the rollout into minibatches of ``grad_accum`` micro-batches (the
        first keeps rollout order, so its micro-batches are the chunks ``score`` measured). Each carries
        its tokens' weights in the minibatch's loss (``loss_agg``, see ``loss_weights``)."""
        s, n = self.settings, len(exp["tokens"])
        per_update = n // s.minibatches
        size = per_update // s.grad_accum
        for epoch in range(s.ppo_epochs):
            g = torch.Generator().manual_seed(s.seed * 1_000_003 + it * 101 + epoch)
            order = (torch.randperm(n, generator=g) if epoch > 0 else torch.arange(n)).to(exp["tokens"].device)
            for mb in range(s.minibatches):
                rows = order[mb * per_update:(mb + 1) * per_update]
                weight, norm = loss_weights(exp["answer_mask"][rows], s.loss_agg, s.max_new_tokens, s.grad_accum * world)
                for micro in range(s.grad_accum):
                    part = slice(micro * size, (micro + 1) * size)
                    batch = select(exp, rows[part])
                    batch.update(loss_weight=weight[part], loss_norm=norm)
                    if self.ptx is not None:
                        step = it * self.updates_per_iter + epoch * s.minibatches + mb
                        batch["ptx"] = self.ptx.micro_batch(step, micro, s.grad_accum, s.batch_size, rank, world)
                    yield batch

    # ---- the rest of the loop's interface
    def token_count(self, batch):
        return int(batch["valid"].sum())

    def record(self, stats: dict) -> None:
        self.update_stats.append({k: float(v) for k, v in stats.items()})

    def evaluate(self, model, d: Dist) -> dict:
        """The iteration's row of metrics.jsonl: its statistics and the updates' (means over ranks),
        beta, and every ``eval_every`` iterations the gold score of held-out prompts."""
        s = self.settings
        names = sorted(self.update_stats[0]) if self.update_stats else []
        upd = [sum(u[k] for u in self.update_stats) / len(self.update_stats) for k in names]
        keys = list(self.iter_stats) + names
        vals = torch.tensor([float(v) for v in self.iter_stats.values()] + upd, dtype=torch.float64, device=d.device)
        vals = all_reduce_sum(vals) / d.world
        res = {k: round(v, 6) for k, v in zip(keys, vals.tolist())}
        res.update(self.mismatch.result(d.device), kl_coef=self.kl_coef, iteration=self.it + 1)
        if res["logp_mismatch_mean"] > s.logp_mismatch_warn and d.main and not self.mismatch_warned:
            self.mismatch_warned = True  # once; metrics.jsonl has it every iteration
            warnings.warn(f"{self.name}: the rollouts' log-probs differ from the trainer's by {res['logp_mismatch_mean']:.2g} "
                          f"per token on average (max {res['logp_mismatch_max']:.2g}; > {self.name}.logp_mismatch_warn="
                          f"{s.logp_mismatch_warn}): the answers are sampled from another distribution than the one "
                          f"trained (a decode step, dtype or autocast that differs from the training forward?)")
        it = res["iteration"]
        if self.eval_rows and self.gold is not None and (it % max(1, s.eval_every) == 0 or it == s.steps):
            mine = self.eval_rows[: s.eval_rows][d.rank:: d.world]
            g = gold_score(self.ac.policy, self.tok, mine, self.gold, s.max_new_tokens, s.temperature, seed=s.seed)
            tot = all_reduce_sum(torch.tensor([g * len(mine), len(mine)], dtype=torch.float64, device=d.device))
            res["gold"] = (tot[0] / tot[1].clamp(min=1)).item()
            if self.selection is not None:
                self.selection.observe(it, res["gold"], self.ac.policy)
        self.update_stats = []
        return res

    # ---- checkpoint hooks: the policy in model.safetensors, the critic and beta in state.pt
    def checkpoint_weights(self, model):
        extra = {"kl_coef": float(self.kl_coef)}
        if self.selection is not None:
            extra["selection"] = self.selection.state()
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
        if self.selection is not None:
            self.selection.load_state(state.get("selection"))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- building and running a stage
def build_rl(cfg: Config, run_dir: Path, d: Dist, name: str, stage_cls) -> tuple[RLStage, Path]:
    """The stage ``name`` of ``cfg`` with everything it loads: tokenizer, prompts, policy, reference,
    reward, critic, gold -> (stage, the policy's init directory). With LoRA settings the policy and the
    critic's backbone train adapters only (the critic's head whole), and the reference is the policy
    itself with its adapters off, unless ``ref_from`` names another."""
    settings, lora = getattr(cfg, name), lora_settings(cfg, name)
    init = resolve_stage(run_dir, settings.init_from, f"{name}.init_from")
    if d.main:  # may copy the tokenizer of the run the policy comes from: one writer
        run_tokenizer(run_dir, init)
    if d.world > 1:
        torch.distributed.barrier()
    tok = run_tokenizer(run_dir, init)
    if not settings.prompts:
        raise ValueError(f"{name}.prompts is not set: give a prompts JSONL ({{\"messages\": [... user turn]}})")
    rows = load_prompts(settings.prompts)
    policy, info = load_model(init, d.device)
    ref = None
    if settings.kl_coef > 0 or getattr(settings, "adaptive_kl", False):
        ref_dir = resolve_stage(run_dir, settings.ref_from, f"{name}.ref_from") if settings.ref_from else init
        ref = policy if lora and not settings.ref_from else frozen(load_model(ref_dir, d.device)[0])
    reward = Reward(settings.reward, run_dir, tok, d.device)
    ac = ActorCritic(policy.requires_grad_(True), stage_cls.make_critic(settings, run_dir, reward, d.device))
    if lora:
        apply_lora(ac.policy, lora, settings.seed)
        if ac.critic is not None:
            apply_lora(ac.critic.backbone, lora, settings.seed + 1)
        no_dropout(ac)  # the adapters' dropout too
    eval_rows = load_prompts(settings.eval_prompts) if settings.eval_prompts else []
    gold = load_scorer(settings.gold) if settings.gold else None
    ptx = None
    if getattr(settings, "ptx_coef", 0.0) > 0:
        from ..data.shards import PretrainBatches, open_split

        ptx = PretrainBatches(open_split(run_dir / "data", "train"), min(settings.seq_len, policy.cfg.block_size), settings.seed)
    stage = stage_cls(settings, tok, rows, ac, ref, reward, info["model"], eval_rows, gold, ptx)
    if lora:
        stage.info = {"lora": lora}
    return stage, init


def loop_config(settings: RLConfig, updates: int):
    """The loop counts optimizer steps; RL configs count iterations of ``updates`` steps each."""
    return dataclasses.replace(settings, steps=settings.steps * updates, warmup_steps=settings.warmup_steps * updates,
                               eval_every=updates, ckpt_every=settings.ckpt_every * updates)


def run_rl(cfg: Config, run_dir, name: str, stage_cls) -> dict:
    """Train the RL stage ``name`` (``stage_cls``) of ``cfg``; writes ``run_dir/name``. Re-running resumes."""
    run_dir = Path(run_dir)
    settings = getattr(cfg, name)
    d = setup_dist(settings.device)
    if d.main and not (run_dir / "config.yaml").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    stage, init = build_rl(cfg, run_dir, d, name, stage_cls)
    if d.main:
        reward = stage.reward
        what = f"reward model {reward.dir}" if reward.model is not None else f"reward {settings.reward}"
        print(f"{name}: {len(stage.rows):,} prompts, {settings.steps} iterations of {stage.rollout_rows()} answers x "
              f"{stage.updates_per_iter} updates; policy from {init}; {what}; beta={settings.kl_coef}"
              + (f"; {summary(stage.ac)}" if stage.info.get("lora") else ""))
    result = train(stage, stage.ac, loop_config(settings, stage.updates_per_iter), run_dir / name, d)
    if settings.keep_best:  # the kept iteration's weights, then the finished mark
        choice = finish_with_best(run_dir / name, d.main)
        if choice is not None:
            result["dev_choice"] = choice
    if d.world > 1:
        torch.distributed.destroy_process_group()
    return result
