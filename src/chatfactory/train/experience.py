"""An RL iteration's experience, the same for every algorithm: which prompts, the policy's answers to
them (train/rollout.py), what the policy, the reference, the critic and the reward make of each answer,
and the minibatches of the updates that learn from it. train/rl.py's ``train_rl`` calls these in order;
``IterationLog`` collects what the iteration reports.

Everything here is a pure function of (seed, iteration, rank) and the weights, which is what makes a
resumed run exact: the prompts come from a seeded permutation, the rollout from a seeded sampler, the
minibatches from a seeded shuffle.
"""

from __future__ import annotations

import torch

from ..inference.calculator import CalcRow
from ..inference.engine import Engine
from ..model.lora import as_reference, lora_layers
from .loop import Dist, autocast_for
from .rl_loss import kl_k1, loss_weights, masked_mean
from .rollout import LogpMismatch, answer_logprobs, forward_answers, logprobs_and_entropy, rollout, select


class IterationLog:
    """What one iteration reports: its rollout's statistics (``rollout``), each minibatch update's
    (``record``), and how far the rollout's log-probs are from the trainer's (``mismatch``)."""

    def __init__(self):
        self.rollout: dict = {}
        self.updates: list[dict] = []
        self.mismatch = LogpMismatch()

    def record(self, stats: dict) -> None:
        self.updates.append({k: float(v) for k, v in stats.items()})


class Rollouts:
    """Where an RL stage's experience comes from: its prompts, the policy that answers them (through one
    Engine, compiled once with ``compile_rollout``), the reference, the critic and the reward that judge
    the answers. ``group`` answers are sampled per prompt (GRPO, RLOO; 1 for PPO); ``needs_old_logp``:
    the algorithm reads the sampling policy's log-probs (else ``score`` skips that forward pass)."""

    def __init__(self, name: str, settings, tok, rows: list[dict], ac, ref, reward, group: int,
                 needs_old_logp: bool):
        self.settings, self.tok, self.rows, self.ac, self.ref, self.reward = settings, tok, rows, ac, ref, reward
        self.group, self.needs_old_logp = group, needs_old_logp
        n = self.answers_per_iteration()
        if n % (settings.minibatches * settings.grad_accum):
            raise ValueError(f"{name}: {n} rollout answers do not split into minibatches={settings.minibatches} "
                             f"x grad_accum={settings.grad_accum}")
        if not rows:
            raise ValueError(f"{name}: no prompts to train on")
        # a prompt must leave room for the answer in the context; the oldest tokens go first
        room = ac.policy.cfg.block_size - settings.max_new_tokens
        if room < 2:
            raise ValueError(f"{name}.max_new_tokens={settings.max_new_tokens} leaves no room for a prompt "
                             f"in block_size={ac.policy.cfg.block_size}")
        self.prompt_ids = [tok.chat_prompt(r["messages"])[-room:] for r in rows]
        if settings.compile_rollout and lora_layers(ac.policy):
            raise ValueError(f"{name}.compile_rollout=true cannot sample a LoRA policy: the compiled decode step "
                             f"reads each linear's weight and would skip the adapters "
                             f"(set {name}.compile_rollout=false)")
        training = ac.policy.training
        # one engine for every rollout: compiled once
        self.engine = Engine(ac.policy, compile=settings.compile_rollout, vocab_limit=tok.vocab_size)
        ac.policy.train(training)
        self._perm_epoch, self._perm = -1, None
        # prompts for the calculator's tasks: every answer runs with it (the reward sees the final answer)
        self.calculator = any(r.get("task") == "calc" for r in self.rows)

    def answers_per_iteration(self) -> int:
        """Answers one rank samples per iteration."""
        return self.settings.rollout_batch * self.group

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
        prompt are contiguous: ``exp["group"]`` of them."""
        picks = [i for i in self.prompts_for(it, rank, world) for _ in range(self.group)]
        s = self.settings
        seed = (s.seed * 1_000_003 + it * 7919 + rank * 104_729) % (2**31)
        tools = [CalcRow(self.tok) for _ in picks] if self.calculator else None
        exp = rollout(self.ac.policy, [self.prompt_ids[i] for i in picks], s.max_new_tokens, s.temperature,
                      self.tok.end_id, self.tok.pad_id, seed, self.engine, tools)
        exp["group"] = self.group  # the prompt runs once per group in the forward passes
        return exp, [self.rows[i] for i in picks]

    @torch.no_grad()
    def score(self, exp: dict, rows: list[dict], log: IterationLog) -> None:
        """Adds to ``exp``: the sampling policy's log-probs (``old_logp``, if needed), the reference's
        (``ref_logp``), the critic's values (``old_values``) and the ``score`` (minus ``no_end_penalty``
        for an answer that never ended); the old log-probs are checked against the rollout's."""
        s = self.settings
        mask = exp["answer_mask"].float()
        # in the micro-batches the updates will use, under the loss's autocast (bf16 on CUDA), so the
        # first update's ratio is exactly 1
        size = len(rows) // (s.minibatches * s.grad_accum)
        old_logp, values, ent, ref_logp = [], [], [], []
        amp = autocast_for(Dist(device=mask.device), s.dtype)
        for i in range(0, len(rows), size):
            chunk = select(exp, torch.arange(i, min(i + size, len(rows)), device=mask.device))
            with amp:
                self._score_chunk(chunk, old_logp, ent, values, ref_logp)
        if old_logp:
            exp["old_logp"] = torch.cat(old_logp) * mask
            log.mismatch.add(exp["old_logp"], exp)  # else the loss measures it on its own forward pass
        if ref_logp:
            exp["ref_logp"] = torch.cat(ref_logp) * mask
        elif old_logp:
            exp["ref_logp"] = exp["old_logp"].clone()
        if values:
            exp["old_values"] = torch.cat(values) * mask
        raw = self.reward(exp, rows)
        ended = exp["ended"].float()
        exp["score"] = raw - s.no_end_penalty * (1 - ended)
        log.rollout = {"score": raw.mean(), "answer_len": mask.sum(1).mean(), "end_rate": ended.mean(),
                       **self.reward.last}
        if old_logp:  # else the loss logs them from its own forward pass
            kl = kl_k1(exp["old_logp"], exp["ref_logp"]) * mask
            log.rollout.update(kl=kl.sum(1).mean(), entropy=masked_mean(torch.cat(ent), mask))

    def _score_chunk(self, chunk, old_logp, ent, values, ref_logp) -> None:
        """Old log-probs and entropy (policy), values (critic), reference log-probs of one chunk."""
        T = self.settings.temperature
        if self.needs_old_logp or self.ac.critic is not None:
            out = self.ac(chunk, policy=self.needs_old_logp)
            if self.needs_old_logp:
                lp, e = logprobs_and_entropy(out["logits"], chunk["tokens"], chunk["start"], T)
                old_logp.append(lp)
                ent.append(e)
            if out["values"] is not None:
                values.append(out["values"].float())
        if self.ref is not None:
            with as_reference(self.ref):  # a LoRA policy: its base, adapters off
                ref_logp.append(answer_logprobs(forward_answers(self.ref, chunk), chunk["tokens"], chunk["start"], T))

    # ---- model FLOPs, for the MFU the trainer logs (GPT.flops_per_token counts them)
    def flops(self, exp: dict) -> float:
        """Model FLOPs of sampling and scoring ``exp`` (forward passes only): the policy writing the answers,
        and the passes ``score`` runs — the sampling policy's log-probs, the critic's values, the
        reference's log-probs, the reward model's score."""
        valid = exp["valid"]
        policy, width = self.ac.policy, valid.size(1)
        total = policy.flops(int(valid.sum()), int(exp["answer_mask"].sum()), width, train=False)
        if self.needs_old_logp:
            total += answer_pass_flops(policy, exp, train=False)
        if self.ac.critic is not None:
            total += self.ac.critic.flops_per_token(width - 1, train=False) * int(valid[:, :-1].sum())
        if self.ref is not None:
            with as_reference(self.ref):  # a LoRA policy's reference is its base: adapters off
                total += answer_pass_flops(self.ref, exp, train=False)
        if self.reward.model is not None:
            total += self.reward.model.flops_per_token(width, train=False) * int(valid.sum())
        return total

    def update_flops(self, batch: dict) -> float:
        """Model FLOPs of one update micro-batch: the policy and the critic forward and backward (and the
        policy on its PPO-ptx text)."""
        total = answer_pass_flops(self.ac.policy, batch)
        valid = batch["valid"][:, :-1]
        if self.ac.critic is not None:
            total += self.ac.critic.flops_per_token(valid.size(1)) * int(valid.sum())
        if batch.get("ptx") is not None:
            x = batch["ptx"][0]
            total += self.ac.policy.flops_per_token(x.size(1)) * x.numel()
        return total

    def minibatches(self, exp: dict, it: int, rank: int, world: int, ptx=None):
        """The iteration's ``ppo_epochs x minibatches`` updates in order, each an iterator over its
        ``grad_accum`` micro-batches: each epoch cuts a shuffle of the rollout into minibatches (the first
        epoch keeps rollout order, so its micro-batches are the chunks ``score`` measured). ``ptx``: the
        pretraining text batches (PPO-ptx) each micro-batch also carries."""
        s, n = self.settings, len(exp["tokens"])
        per_update = n // s.minibatches
        for epoch in range(s.ppo_epochs):
            g = torch.Generator().manual_seed(s.seed * 1_000_003 + it * 101 + epoch)
            order = (torch.randperm(n, generator=g) if epoch > 0 else torch.arange(n)).to(exp["tokens"].device)
            for mb in range(s.minibatches):
                step = (it * s.ppo_epochs + epoch) * s.minibatches + mb
                yield self._micro_batches(exp, order[mb * per_update:(mb + 1) * per_update], step, rank, world, ptx)

    def _micro_batches(self, exp: dict, rows: torch.Tensor, step: int, rank: int, world: int, ptx):
        """One update's micro-batches, made as the trainer asks for them. Each carries its tokens'
        weights in the minibatch's loss (``loss_agg``, see rl_loss.loss_weights)."""
        s = self.settings
        size = len(rows) // s.grad_accum
        weight, norm = loss_weights(exp["answer_mask"][rows], s.loss_agg, s.max_new_tokens, s.grad_accum * world)
        for micro in range(s.grad_accum):
            part = slice(micro * size, (micro + 1) * size)
            batch = select(exp, rows[part])
            batch.update(loss_weight=weight[part], loss_norm=norm)
            if ptx is not None:
                batch["ptx"] = ptx.micro_batch(step, micro, s.grad_accum, s.batch_size, rank, world)
            yield batch


def answer_pass_flops(model, batch: dict, train: bool = True) -> float:
    """Model FLOPs of ``forward_answers(model, batch)`` (with its backward if ``train``): the prompt and
    answer tokens through the blocks, a group's shared prompt once, and the answer positions through the
    LM head."""
    s, g = batch["start"], batch.get("group", 1)
    valid = batch["valid"][:, :-1]
    tokens = int(valid[:, :s].sum()) // g + int(valid[:, s:].sum())
    return model.flops(tokens, int(batch["answer_mask"].sum()), valid.size(1), train=train)
