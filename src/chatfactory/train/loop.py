"""The one training loop every stage shares.

A stage (pretrain, SFT, reward, …) supplies only what is particular to it, as a ``Stage``:
``micro_batch(step, micro, rank, world)``, ``loss(model, batch)``, ``evaluate(model)`` and how many
tokens a micro-batch holds; ``train`` runs it. The ``Trainer`` owns the rest: device and DDP set-up
(or FSDP2, and activation checkpointing: memory.py), AdamW with a warmup + cosine schedule, gradient
accumulation and clipping, bf16 autocast and ``torch.compile`` on CUDA, validation, ``metrics.jsonl``,
a progress bar with tokens/s and MFU, atomic checkpoints and exact resume. ``train`` is a short loop
over its pieces; the RL stages drive the same pieces from their own iteration (train/rl.py).

Exact resume rests on two rules: batches are a pure function of the step (the stage's loaders are
stateless), and the random generators are re-seeded from (seed, step, rank) at the start of every
step, so nothing random depends on history. A run killed at any moment and restarted continues
from its last checkpoint and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import TrainConfig
from ..store.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    load_weights,
    repair_checkpoint,
    save_checkpoint,
    unique_state_dict,
)
from ..store.files import CheckpointError
from . import memory
from .meters import Metrics, peak_flops


# ---------------------------------------------------------------- distributed / device
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: str = "auto") -> Dist:
    """Read torchrun's environment; start the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def use_fsdp(stage, cfg: TrainConfig, d: Dist) -> bool:
    """Whether this run shards with FSDP2: asked for (``fsdp=true``), by a stage that supports it, over
    more than one process. One process has nothing to shard across: it trains unsharded, with a note,
    so one config serves a laptop run and a torchrun."""
    if not cfg.fsdp:
        return False
    why = stage.fsdp_unsupported
    if not why and type(stage).checkpoint_weights is not Stage.checkpoint_weights:
        why = "it writes its own checkpoint contents (checkpoint_weights), which the sharded save does not gather"
    if why:
        raise ValueError(f"{stage.name}.fsdp=true: the {stage.name} stage cannot train under FSDP2: {why}; "
                         f"set {stage.name}.fsdp=false (torchrun then uses DDP)")
    if d.world == 1:
        if d.main:
            print(f"[{stage.name}] {stage.name}.fsdp=true with one process: training unsharded "
                  f"(start with torchrun --nproc_per_node=N to shard over N processes)")
        return False
    return True


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def autocast_for(d: Dist, dtype: str):
    if dtype == "auto":
        dtype = "bfloat16" if d.device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(d.device.type, dtype=getattr(torch, dtype))


# ---------------------------------------------------------------- schedule / optimizer
def lr_at(step: int, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step — or, with a
    ``time_budget``, at ``time_fraction`` 1 (the share of the budget's training time used)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.time_budget and time_fraction is not None:
        progress = min(1.0, time_fraction)
    else:
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW; matrices decay, vectors (norms, biases) do not — as in GPT-2/nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel does the whole update in one pass over memory (CPU and CUDA)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cpu", "cuda"))


def reseed(seed: int, step: int, rank: int) -> None:
    s = (seed * 1_000_003 + step * 7919 + rank) % (2**63)
    torch.manual_seed(s)
    random.seed(s)


# ---------------------------------------------------------------- the loop
class Stage:
    """What a training stage provides: its name and what its checkpoint holds (the ``Trainer``'s part), and
    for ``train`` its micro-batches, loss and evaluation. See pretrain.py for the reference example; an
    RL stage (train/rl.py) drives its own iterations and gives only the first part."""

    name = "stage"
    model_config: dict = {}
    info: dict = {}  # more entries for config.json (a LoRA stage's settings: model/lora.py)
    fsdp_unsupported: str = ""  # why this stage cannot train under FSDP2 ("": it can)
    budget_unsupported: str = ""  # why this stage cannot stop by a time_budget ("": it can)
    # a stage with work after training that belongs to its final weights (the reward model's bias shift)
    # marks its checkpoint finished itself once that work is saved: the loop's last save is then left
    # unfinished, so a crash in between never leaves a finished stage without it
    finishes_itself: bool = False

    def micro_batch(self, step: int, micro: int, rank: int, world: int):
        raise NotImplementedError

    def loss(self, model, batch) -> torch.Tensor:
        raise NotImplementedError

    def token_count(self, batch) -> int:
        """How many tokens the micro-batch trains on (the tok/s the loop logs)."""
        raise NotImplementedError

    def flops(self, model, batch) -> float:
        """Model FLOPs of training on the micro-batch, forward and backward, as ``GPT.flops_per_token``
        counts them (the MFU the loop logs). ``model`` is the unwrapped model. Here: every counted token
        through the whole model at the stage's ``seq_len``; a stage whose tokens do not all take the same
        path (an LM head only on the scored tokens, a reference's forward pass) counts its own."""
        per_token = getattr(model, "flops_per_token", None)
        return per_token(getattr(self, "seq_len", None)) * self.token_count(batch) if per_token else 0.0

    def evaluate(self, model, d: Dist) -> dict:
        return {}

    # A stage that trains more than one network (PPO: policy + critic) keeps the policy in
    # model.safetensors, so ``load_model`` reads it like any stage, and the rest in state.pt.
    def checkpoint_weights(self, model) -> tuple[dict, dict]:
        """-> (tensors for model.safetensors, extra entries for state.pt)."""
        return unique_state_dict(model), {}

    def restore_weights(self, model, weights: dict, state: dict, where: str) -> None:
        """Undo ``checkpoint_weights`` on resume."""
        load_weights(model, weights, where)


def _to(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    """The training machinery every stage shares, as pieces a stage's loop calls: made, it has set up the
    device, DDP or FSDP2, resumed from ``stage_dir``'s checkpoint (``start``: the step to continue from)
    and made the optimizer; ``step`` takes one optimizer step on the micro-batches it is given;
    ``evaluating``/``log`` record an evaluation; ``checkpoint`` saves; ``finish`` returns the last
    metrics. ``stage`` names the run and says what its checkpoint holds (a ``Stage``). ``train`` below is
    the loop of the stages that hand out micro-batches; train/rl.py drives its own iterations."""

    def __init__(self, stage: Stage, model: torch.nn.Module, cfg: TrainConfig, stage_dir, d: Dist | None = None):
        self.stage, self.cfg = stage, cfg
        if cfg.time_budget and stage.budget_unsupported:
            raise ValueError(f"{stage.name}.time_budget: {stage.budget_unsupported}")
        self.d = d = d or setup_dist(cfg.device)
        self.dir = Path(stage_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics(self.dir / "metrics.jsonl", d.main)
        self.fsdp = use_fsdp(stage, cfg, d)
        # sharding moves the weights to the device block by block; unsharded, the whole model goes now
        home = torch.device("cpu") if self.fsdp else d.device
        model.to(home)
        saved_opt = self._resume(model, home)

        if cfg.activation_checkpointing:
            memory.checkpoint_blocks(model)
        self.raw_model = model
        if self.fsdp:
            if cfg.compile:  # blocks compiled before sharding, as torchtitan does; FSDP's hooks stay eager
                for block in memory.transformer_blocks(model):
                    block.compile()
            memory.shard(model, d.device, d.world)
        elif cfg.compile:
            model = torch.compile(model)
        if d.world > 1 and not self.fsdp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self.model = model
        # made after sharding: FSDP2 replaces each parameter with its shard
        self.opt = make_optimizer(self.raw_model, cfg, d.device)
        if saved_opt is not None:
            memory.load_optimizer_state(self.opt, saved_opt)
            del saved_opt  # the whole optimizer state (twice the model) is not kept for the run either
        self.autocast = autocast_for(d, cfg.dtype)
        self.peak, self.peak_rechecks, self.flops = self._measure_peak(), 0, 0.0
        # the time budget: what the loop has used (``spent``), what a step, an evaluation and a checkpoint
        # cost as last measured (None: not yet), and whether it stopped for the budget (``_resume``)
        self.costs: dict = {"step": 0.0, "eval": None, "ckpt": None}
        self._clock = time.perf_counter()
        self.last: dict = {}
        self.bar = tqdm(total=None if cfg.time_budget else cfg.steps, initial=self.start, desc=stage.name,
                        disable=not (d.main and cfg.progress), dynamic_ncols=True)
        self._begun, self._t0, self.lr = None, 0.0, cfg.lr
        self.model.train()

    def _measure_peak(self) -> float:
        """The peak FLOP/s MFU is measured against: every rank's, summed."""
        return float(all_reduce_sum(torch.tensor(peak_flops(self.d.device, self.cfg.dtype), dtype=torch.float64,
                                                 device=self.d.device)))

    def _mfu(self, flops: float, seconds: float) -> float:
        """The model FLOPs utilisation of a step that did ``flops`` (every rank's) in ``seconds``. A step
        faster than the peak means the peak was measured at a bad moment (another process on the cores, a
        CPU still clocking up): it is measured again, twice at most, and kept if higher."""
        if not self.peak:
            return 0.0
        if flops / seconds > self.peak and self.peak_rechecks < 2:
            self.peak_rechecks += 1
            before, self.peak = self.peak, max(self.peak, self._measure_peak())
            if flops / seconds > self.peak and self.d.main:
                warnings.warn(f"{self.stage.name}: a step ran {flops / seconds / 1e9:.1f} GFLOP/s, above the "
                              f"measured matmul peak ({before / 1e9:.1f}, then {self.peak / 1e9:.1f} GFLOP/s): the "
                              f"MFU it logs is over 100% (is the stage's FLOP count right?)", stacklevel=3)
        return flops / seconds / self.peak

    def _resume(self, model, home):
        """Continue from the checkpoint in the stage directory, if any (``start``, ``elapsed``, the
        weights); drop metrics rows past it. -> the saved optimizer state, or None."""
        d, stage, stage_dir = self.d, self.stage, self.dir
        self.start, self.elapsed, saved_opt = 0, 0.0, None
        self.spent_before, self.stopped = 0.0, False
        if d.main and has_checkpoint(stage_dir):
            repair_checkpoint(stage_dir)  # the writer: finish or discard a save a kill cut short (maybe the first)
        if d.world > 1:
            dist.barrier()
        if has_checkpoint(stage_dir):
            weights, saved_cfg, state = load_checkpoint(stage_dir, with_state=True)
            if state is None:
                raise CheckpointError(f"{stage_dir / 'state.pt'}: missing, so the run in {stage_dir} cannot resume "
                                      f"(it holds final weights only; use a new output directory)")
            if saved_cfg.get("lora") != stage.info.get("lora"):
                raise CheckpointError(f"{stage_dir}: trained with lora={saved_cfg.get('lora')}, but this run asks for "
                                      f"lora={stage.info.get('lora')} (resume with the same lora settings, "
                                      f"or use a new output directory)")
            stage.restore_weights(model, {k: v.to(home) for k, v in weights.items()}, state,
                                  str(stage_dir / "model.safetensors"))
            del weights  # a whole copy of the model: not kept for the run
            saved_opt, self.start = state.pop("optimizer"), int(state["step"])
            self.elapsed = float(state.get("elapsed", 0.0))
            self.spent_before = float(state.get("spent", self.elapsed))
            self.stopped = bool(saved_cfg.get("finished")) and self.cfg.time_budget > 0  # spent its budget
            self.metrics.truncate_after(self.start)
            if d.main and self.start < self.cfg.steps:
                print(f"[{stage.name}] resuming from step {self.start} in {stage_dir}")
        else:
            self.metrics.truncate_after(0)  # rows of a run killed before its first checkpoint: work that is redone
        if d.world > 1:
            dist.barrier()  # rank 0 has truncated metrics before anyone writes
        return saved_opt

    def begin(self, step: int) -> None:
        """Start optimizer step ``step``: its clock, the random generators re-seeded from (seed, step, rank),
        its learning rate. ``step`` calls it; a stage calls it earlier for work that belongs to the step
        (an RL iteration's rollout is part of its first update)."""
        if self._begun == step:
            return
        self._begun, self._t0, self.flops = step, time.perf_counter(), 0.0
        reseed(self.cfg.seed, step, self.d.rank)
        self.lr = lr_at(step, self.cfg, self.time_fraction())
        for g in self.opt.param_groups:
            g["lr"] = self.lr

    @property
    def spent(self) -> float:
        """Wall-clock seconds the loop has used in this stage (steps, evaluations, checkpoints), resumes included."""
        return self.spent_before + time.perf_counter() - self._clock

    def time_fraction(self) -> float | None:
        """With a time budget: the share used of the time it leaves for training (the budget less the final
        evaluation and checkpoint, as last measured), which the learning rate's decay follows."""
        if not self.cfg.time_budget:
            return None
        train_time = self.cfg.time_budget - (self.costs["eval"] or 0.0) - (self.costs["ckpt"] or 0.0)
        return self._slowest(self.spent) / max(train_time, 1e-9)  # one figure on every rank: the same lr

    def out_of_time(self, evals: int = 1, ckpts: int = 1) -> bool:
        """With a time budget: another step and ``evals`` evaluations and ``ckpts`` checkpoints (the final
        ones, and any due before that step), as last measured, would not fit in what is left of it (the same
        answer on every rank). Then ``stopped`` is set."""
        if not self.cfg.time_budget:
            return False
        need = self.costs["step"] + evals * (self.costs["eval"] or 0.0) + ckpts * (self.costs["ckpt"] or 0.0)
        self.stopped = self.stopped or self._slowest(self.spent) + need > self.cfg.time_budget
        return self.stopped

    def _slowest(self, seconds: float) -> float:
        """The largest of every rank's ``seconds``: a figure all ranks agree on, so they decide alike."""
        if self.d.world > 1:
            t = torch.tensor([seconds], dtype=torch.float64, device=self.d.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t.item()
        return seconds

    def _cost(self, what: str, seconds: float) -> None:
        """The cost of a step, evaluation or checkpoint: the slowest rank's."""
        if self.cfg.time_budget:
            self.costs[what] = self._slowest(seconds)

    def add_flops(self, flops: float) -> None:
        """Model FLOPs of work that belongs to the current step besides its micro-batches' training (an
        RL iteration's rollout), for its MFU."""
        self.flops += flops

    def step(self, step: int, micro_batches, loss_fn, count_tokens, count_flops=None) -> None:
        """Optimizer step ``step`` on ``micro_batches`` (``grad_accum`` of them, made as they are asked
        for): ``loss_fn(model, batch)`` under autocast, backward with the loss / grad_accum, the gradients
        clipped, the optimizer stepped; the step's row of metrics.jsonl and the progress bar.
        ``count_tokens(batch)`` and ``count_flops(batch)`` give the tok/s and MFU it logs."""
        cfg, d = self.cfg, self.d
        self.begin(step)
        loss_sum = torch.zeros((), device=d.device)
        n_tok = 0
        for micro, batch in enumerate(micro_batches):
            batch = _to(batch, d.device)
            # DDP all-reduces only the last micro-batch's gradients; FSDP reduce-scatters each one (its
            # gradients stay sharded, which is the memory it saves)
            sync = (self.model.no_sync() if (d.world > 1 and not self.fsdp and micro < cfg.grad_accum - 1)
                    else contextlib.nullcontext())
            with sync:
                with self.autocast:
                    loss = loss_fn(self.model, batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            n_tok += count_tokens(batch)
            if count_flops is not None:
                self.flops += count_flops(batch)
        grad_norm = (memory.grad_norm_value(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip))
                     if cfg.grad_clip > 0 else torch.zeros(()))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        stats = all_reduce_sum(torch.stack([loss_sum / cfg.grad_accum,
                                            torch.tensor(float(n_tok), device=d.device)]).float())
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        dt = time.perf_counter() - self._t0
        self.elapsed += dt
        done = step + 1
        train_loss, tokens = stats[0].item() / d.world, stats[1].item()
        tok_s = tokens / dt
        # every rank's FLOPs over the ranks' mean time: the same figure on each rank
        flops, seconds = all_reduce_sum(torch.tensor([self.flops, dt], dtype=torch.float64, device=d.device)).tolist()
        mfu = self._mfu(flops, seconds / d.world)
        self.costs["step"] = seconds / d.world
        self.last.update(loss=train_loss)
        if done % cfg.log_every == 0 or done == cfg.steps:
            self.metrics.log({"step": done, "loss": round(train_loss, 6), "lr": self.lr, "grad_norm": float(grad_norm),
                              "tok_s": round(tok_s, 1), "mfu": round(mfu, 4), "elapsed": round(self.elapsed, 3)})
        self.bar.set_postfix_str(f"loss {train_loss:.4f} | {tok_s:,.0f} tok/s | MFU {mfu:.1%}")
        self.bar.update(1)

    @contextlib.contextmanager
    def evaluating(self):
        """The body runs as an evaluation: eval mode, no gradients, the training autocast, FSDP's shards
        gathered; it yields the unwrapped model."""
        self.model.eval()
        with torch.no_grad(), self.autocast, memory.gathered(self.raw_model):
            yield self.raw_model
        self.model.train()

    def log(self, step: int, row: dict) -> None:
        """An evaluation's row of metrics.jsonl (printed too without a progress bar); kept for ``finish``."""
        if row:
            self.metrics.log({"step": step, **row})
            self.last.update(row)
            if self.d.main and not self.cfg.progress:
                print(f"[{self.stage.name}] step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items()))

    def evaluate(self, step: int, evaluate) -> None:
        """``evaluate(model, d) -> row`` as an evaluation, then logged."""
        t = time.perf_counter()
        with self.evaluating() as model:
            row = evaluate(model, self.d)
        self._cost("eval", time.perf_counter() - t)
        self.log(step, row)

    def checkpoint(self, step: int) -> None:
        """Save weights, optimizer and the stage's extra state atomically, marked finished at the last step
        or when the time budget stopped the run (unless the stage finishes itself); every rank takes part."""
        d, stage, t = self.d, self.stage, time.perf_counter()
        if self.fsdp:  # gathering the shards is a collective: every rank takes part, rank 0 keeps the result
            weights, extra = memory.full_weights(self.raw_model, d.main), {}
            opt_state = memory.full_optimizer_state(self.opt, d.main)
        elif d.main:
            (weights, extra), opt_state = stage.checkpoint_weights(self.raw_model), self.opt.state_dict()
        if d.main:
            state = {"optimizer": opt_state, "elapsed": self.elapsed, "spent": self.spent, **extra}
            info = {"stage": stage.name, "model": stage.model_config,
                    "finished": (step >= self.cfg.steps or self.stopped) and not stage.finishes_itself, **stage.info}
            save_checkpoint(self.dir, weights, info, state, step)
        if d.world > 1:
            dist.barrier()
        self._cost("ckpt", time.perf_counter() - t)

    def finish(self) -> dict:
        """-> the last metrics: train loss, the last evaluation's entries, and the run's elapsed seconds."""
        self.bar.close()
        self.last["elapsed"] = self.elapsed
        if self.model is not self.raw_model:
            # DDP's reducer holds the process group. Freed after the stage's destroy_process_group, it would
            # free the group with the GIL held, and the group's destructor joins gloo's worker threads, one of
            # which may wait for the GIL to free a finished collective's tensors: a deadlock (rank 1 of a
            # torchrun PPO hung so). Freed here, it lets go of a group still registered, which
            # destroy_process_group then frees with the GIL released.
            self.model = self.raw_model
            gc.collect()  # DDP's hooks make reference cycles
        return self.last


def train(stage: Stage, model: torch.nn.Module, cfg: TrainConfig, stage_dir, d: Dist | None = None) -> dict:
    """Train ``model`` for ``cfg.steps`` optimizer steps on the stage's micro-batches, resuming from
    ``stage_dir`` if it holds a checkpoint; evaluate every ``eval_every`` steps and checkpoint every
    ``ckpt_every`` (and both at the end). Returns the last metrics (train loss and the final evaluation)."""
    trainer = Trainer(stage, model, cfg, stage_dir, d)
    rank, world = trainer.d.rank, trainer.d.world
    for step in range(trainer.start, cfg.steps):
        if trainer.stopped:  # a resumed run that had spent its time budget
            break
        micro_batches = (stage.micro_batch(step, micro, rank, world) for micro in range(cfg.grad_accum))
        trainer.step(step, micro_batches, stage.loss, stage.token_count,
                     functools.partial(stage.flops, trainer.raw_model))
        done = step + 1
        due_eval, due_ckpt = (bool(every) and done % every == 0 for every in (cfg.eval_every, cfg.ckpt_every))
        # going on means this step's periodic evaluation and checkpoint (if due), another step, the final ones
        last = done == cfg.steps or trainer.out_of_time(1 + due_eval, 1 + due_ckpt)
        # with a time budget the first step also evaluates and checkpoints: what they cost decides when to stop
        first = cfg.time_budget and trainer.costs["ckpt"] is None
        if last or first or due_eval:
            trainer.evaluate(done, stage.evaluate)
        if last or first or due_ckpt:
            trainer.checkpoint(done)
        if last:
            break
    return trainer.finish()
