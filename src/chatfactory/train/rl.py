"""The loop every RL stage runs: PPO (train/ppo.py), GRPO (train/grpo.py) and RLOO (train/rloo.py) bring
only their algorithm — advantages, loss, critic — and ``train_rl`` reads one iteration top to bottom:

    sample     the policy answers this iteration's prompts              (train/experience.py)
    score      log-probs (policy, reference), values, the reward        (train/experience.py)
    advantages the algorithm's: GAE (PPO), a group baseline (GRPO, RLOO)
    update     ppo_epochs x minibatches optimizer steps on that experience
    log        the iteration's statistics, and every eval_every iterations the gold score of held-out prompts
    checkpoint every ckpt_every iterations and at the end

The shared ``Trainer`` (train/loop.py) does the rest, as for every stage: the optimizer and its schedule,
gradient accumulation and clipping, DDP, autocast, metrics.jsonl, the progress bar, checkpoints and
exact resume. It counts optimizer steps, so an iteration is ``ppo_epochs * minibatches`` of them and
checkpoints fall between iterations: the next rollout is a pure function of the weights and the seed, so
a resumed run is exact. Also here: building a stage's parts (``build_rl``) and running it (``run_rl``).

    chatfactory ppo --config tiny --out runs/NAME ppo.prompts=prompts.jsonl      # (or grpo, rloo)
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from pathlib import Path

import torch

from ..config import Config, RLConfig, save_config
from ..data.preferences import load_prompts
from ..data.scorer import load_scorer
from ..model.lora import apply_lora, lora_settings, summary
from ..store.checkpoint import load_weights, resolve_stage, unique_state_dict
from ..store.load import load_model
from .experience import IterationLog, Rollouts
from .loop import Dist, Stage, Trainer, all_reduce_sum, setup_dist
from .pairs import run_tokenizer
from .rl_loss import AGGREGATIONS
from .rl_models import ActorCritic, Reward, frozen, no_dropout
from .selection import BestIteration, finish_with_best, gold_score


def train_rl(stage: RLStage, trainer: Trainer) -> dict:
    """Train ``stage`` for ``steps`` iterations (from where its checkpoint left off) -> the last metrics."""
    s, d, algo = stage.settings, trainer.d, stage.algo
    updates = stage.updates  # optimizer steps per iteration
    for it in range(trainer.start // updates, s.steps):
        first = it * updates
        trainer.begin(first)  # the first update's step starts here: seeded from (seed, step, rank), timed
        log, t0 = IterationLog(), time.perf_counter()
        exp, rows = stage.rollouts.sample(it, d.rank, d.world)  # 1. the policy answers this iteration's prompts
        t1 = time.perf_counter()
        stage.rollouts.score(exp, rows, log)  # 2. what the policy, reference, critic and reward make of them
        exp.update(algo.advantages(exp, log))  # 3. the algorithm's advantages
        _sync(exp["tokens"].device)
        log.rollout.update(t_rollout=torch.tensor(t1 - t0), t_score=torch.tensor(time.perf_counter() - t1))
        trainer.add_flops(stage.rollouts.flops(exp))  # the rollout's work is the first update's step's
        # 4. ppo_epochs x minibatches updates, each an optimizer step on its micro-batches
        for u, micro_batches in enumerate(stage.rollouts.minibatches(exp, it, d.rank, d.world, stage.ptx)):
            trainer.step(first + u, micro_batches, functools.partial(algo.loss, log=log), _tokens,
                         stage.rollouts.update_flops)
        done = first + updates
        with trainer.evaluating():  # 5. the iteration's row of metrics.jsonl
            row = stage.report(log, it + 1, d)
            row.update(stage.evaluate_gold(it + 1, d))
        trainer.log(done, row)
        if (s.ckpt_every and (it + 1) % s.ckpt_every == 0) or it + 1 == s.steps:
            trainer.checkpoint(done)  # 6. between iterations, so a resumed run starts on a fresh rollout
    return trainer.finish()


def _tokens(batch: dict) -> int:
    return int(batch["valid"].sum())


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RLStage(Stage):
    """An RL stage's parts: the algorithm (``PPO`` or ``GRPO`` with its baseline), where its experience
    comes from (``Rollouts``), the trained networks (``ActorCritic``), the held-out prompts and gold
    scorer; and what its checkpoint holds: the policy in model.safetensors (``load_model`` reads it like
    any stage's), the critic, beta and the best iteration so far (``keep_best``) in state.pt."""

    fsdp_unsupported = ("each rank samples its rollouts on its own, a different number of forward passes per "
                        "rank, which FSDP2's per-forward all-gathers cannot follow; and its checkpoint holds "
                        "a critic and beta beside the policy")
    budget_unsupported = ("an RL stage runs whole iterations and evaluates the gold score at its last one: "
                          "set its steps (iterations) instead")

    def __init__(self, name: str, settings: RLConfig, algo, tok, rows: list[dict], ac: ActorCritic, ref,
                 reward: Reward, model_config: dict, eval_rows=None, gold=None, ptx=None):
        self.name, self.settings, self.algo, self.tok, self.ac = name, settings, algo, tok, ac
        self.model_config, self.eval_rows, self.gold, self.ptx = model_config, eval_rows or [], gold, ptx
        self.updates = settings.ppo_epochs * settings.minibatches
        if settings.loss_agg not in AGGREGATIONS:
            raise ValueError(f"{name}.loss_agg must be one of {', '.join(AGGREGATIONS)}, got {settings.loss_agg!r}")
        self.rollouts = Rollouts(name, settings, tok, rows, ac, ref, reward, algo.group, algo.needs_old_logp)
        self.mismatch_warned = False
        self.selection = BestIteration.for_stage(name, settings, self.eval_rows, gold)  # None unless keep_best
        self.finishes_itself = self.selection is not None  # finish_with_best writes the finished mark

    def report(self, log: IterationLog, iteration: int, d: Dist) -> dict:
        """Iteration ``iteration``'s statistics (its rollout's and the mean of its updates', means over
        ranks), the rollout/trainer log-prob mismatch and beta; warns once if the mismatch is large."""
        s = self.settings
        names = sorted(log.updates[0]) if log.updates else []
        upd = [sum(u[k] for u in log.updates) / len(log.updates) for k in names]
        keys = list(log.rollout) + names
        vals = torch.tensor([float(v) for v in log.rollout.values()] + upd, dtype=torch.float64, device=d.device)
        vals = all_reduce_sum(vals) / d.world
        res = {k: round(v, 6) for k, v in zip(keys, vals.tolist())}
        res.update(log.mismatch.result(d.device), kl_coef=self.algo.kl_coef, iteration=iteration)
        if res["logp_mismatch_mean"] > s.logp_mismatch_warn and d.main and not self.mismatch_warned:
            self.mismatch_warned = True  # once; metrics.jsonl has it every iteration
            warnings.warn(f"{self.name}: the rollouts' log-probs differ from the trainer's by "
                          f"{res['logp_mismatch_mean']:.2g} per token on average (max {res['logp_mismatch_max']:.2g}; "
                          f"> {self.name}.logp_mismatch_warn={s.logp_mismatch_warn}): the answers are sampled from "
                          f"another distribution than the one trained (a decode step, dtype or autocast that "
                          f"differs from the training forward?)", stacklevel=2)
        return res

    def evaluate_gold(self, iteration: int, d: Dist) -> dict:
        """Every ``eval_every`` iterations and at the end: {"gold": the gold score of the policy's answers
        to the first ``eval_rows`` held-out prompts (split over ranks)}, which ``keep_best`` also tracks;
        {} otherwise or without eval_prompts and gold."""
        s = self.settings
        if not (self.eval_rows and self.gold is not None and (iteration % max(1, s.eval_every) == 0
                                                              or iteration == s.steps)):
            return {}
        mine = self.eval_rows[: s.eval_rows][d.rank:: d.world]
        g = gold_score(self.ac.policy, self.tok, mine, self.gold, s.max_new_tokens, s.temperature, seed=s.seed)
        tot = all_reduce_sum(torch.tensor([g * len(mine), len(mine)], dtype=torch.float64, device=d.device))
        gold = (tot[0] / tot[1].clamp(min=1)).item()
        if self.selection is not None:
            self.selection.observe(iteration, gold, self.ac.policy)
        return {"gold": gold}

    # ---- the Trainer's checkpoint hooks
    def checkpoint_weights(self, model):
        extra = {"kl_coef": float(self.algo.kl_coef)}
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
        self.algo.kl_coef = float(state.get("kl_coef", self.algo.kl_coef))
        if self.selection is not None:
            self.selection.load_state(state.get("selection"))


# ---------------------------------------------------------------- building and running a stage
def build_rl(cfg: Config, run_dir: Path, d: Dist, name: str, algo) -> tuple[RLStage, Path]:
    """The stage ``name`` of ``cfg`` with everything it loads: tokenizer, prompts, policy, reference,
    reward, the algorithm's critic, gold -> (stage, the policy's init directory). With LoRA settings the
    policy and the critic's backbone train adapters only (the critic's head whole), and the reference is
    the policy itself with its adapters off, unless ``ref_from`` names another."""
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
    reward = Reward(settings.reward, run_dir, tok, d.device, settings.verifier, settings.verifier_weight)
    ac = ActorCritic(policy.requires_grad_(True), algo.make_critic(run_dir, reward, d.device))
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

        ptx = PretrainBatches(open_split(run_dir / "data", "train"), min(settings.seq_len, policy.cfg.block_size),
                              settings.seed)
    stage = RLStage(name, settings, algo, tok, rows, ac, ref, reward, info["model"], eval_rows, gold, ptx)
    if lora:
        stage.info = {"lora": lora}
    return stage, init


def loop_config(settings: RLConfig, updates: int):
    """The trainer counts optimizer steps; RL configs count iterations of ``updates`` steps each."""
    return dataclasses.replace(settings, steps=settings.steps * updates, warmup_steps=settings.warmup_steps * updates)


def run_rl(cfg: Config, run_dir, name: str, algo) -> dict:
    """Train the RL stage ``name`` of ``cfg`` with ``algo`` (train/ppo.py ``PPO``, train/grpo.py ``GRPO``);
    writes ``run_dir/name``. Re-running resumes."""
    run_dir = Path(run_dir)
    settings = getattr(cfg, name)
    d = setup_dist(settings.device)
    if d.main and not (run_dir / "config.yaml").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    stage, init = build_rl(cfg, run_dir, d, name, algo)
    if d.main:
        print(f"{name}: {len(stage.rollouts.rows):,} prompts, {settings.steps} iterations of "
              f"{stage.rollouts.answers_per_iteration()} answers x {stage.updates} updates; policy from {init}; "
              f"{stage.rollouts.reward.describe()}; beta={settings.kl_coef}"
              + (f"; {summary(stage.ac)}" if stage.info.get("lora") else ""))
    trainer = Trainer(stage, stage.ac, loop_config(settings, stage.updates), run_dir / name, d)
    result = train_rl(stage, trainer)
    if settings.keep_best:  # the kept iteration's weights, then the finished mark
        choice = finish_with_best(run_dir / name, d.main)
        if choice is not None:
            result["dev_choice"] = choice
    if d.world > 1:
        torch.distributed.destroy_process_group()
    return result
