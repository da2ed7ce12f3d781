"""One RL update's gradients on fixed answers, for tests/test_rl_aggregation.py and the ``torchrun``
script it starts (which imports this module, not the test module): ``experience.rollout`` is replaced by
``_fixed_rollout``, so every way of splitting the minibatch (one micro-batch, several, several ranks) sees
the same 8 answers. The first four answers are short and the last four long."""
from collections import Counter
from pathlib import Path

import torch

from builders.rl_world import collect
from chatfactory.config import Config, GRPOConfig, PPOConfig
from chatfactory.train import experience, rl
from chatfactory.train.grpo import GRPO
from chatfactory.train.loop import setup_dist
from chatfactory.train.ppo import PPO
from chatfactory.train.rl_loss import AGGREGATIONS
from chatfactory.train.rollout import pad_batch

AGGS = list(AGGREGATIONS)

# short answers first, long ones after; a few never end (no <|end|>)
ANSWERS = ["blue", "red", "green blue", "pink", "red blue green pink blue", "green green pink red blue",
           "blue red pink green", "pink pink blue red green"]


def _fixed_rollout(order: list[tuple], group: int, tok):
    """A stand-in for rollout.rollout: the j-th row of the prompt at position p of the iteration's global
    prompt order ``order`` gets ANSWERS[p * group + j], whichever rank asks."""
    def fake(policy, prompts, max_new_tokens, temperature, end_id, pad_id, seed=None, engine=None, tools=None):
        seen, answers = Counter(), []
        for p in map(tuple, prompts):
            k = order.index(p) * group + seen[p]
            seen[p] += 1
            answers.append(tok.encode(ANSWERS[k])[:max_new_tokens - 1] + ([end_id] if k % 3 else []))
        batch = pad_batch(prompts, answers, pad_id, end_id)
        batch["rollout_logp"] = torch.zeros(batch["answer_mask"].shape)  # (the mismatch it measures is not looked at)
        dev = next(policy.parameters()).device
        return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
    return fake


def gradients(root: Path, algo: str, agg: str, grad_accum: int, own_norm: bool = False) -> dict:
    """The gradients of iteration 0's first update of ``algo`` on the fixed answers, on this process
    (one of ``WORLD_SIZE``), as the loop takes it: each micro-batch's loss / grad_accum, backward (through
    DDP on several ranks). ``own_norm``: each micro-batch normalised by its own tokens (the wrong way)."""
    d = setup_dist("cpu")
    run = root / "run"
    common = dict(prompts=str(root / "prompts.jsonl"), reward="rl_gold:score", init_from=str(run / "sft"),
                  max_new_tokens=6, kl_coef=0.1, loss_agg=agg, grad_accum=grad_accum, minibatches=1, ppo_epochs=1,
                  seed=3, device="cpu", progress=False)
    cfg = Config()
    if algo == "ppo":
        cfg.ppo = PPOConfig(**common, rollout_batch=8 // d.world, critic_from=str(run / "sft"))
        algorithm, group = PPO(cfg.ppo), 1
    else:
        cfg.grpo = GRPOConfig(**common, rollout_batch=2 // d.world, group_size=4)
        algorithm, group = GRPO(cfg.grpo), 4
    stage, _ = rl.build_rl(cfg, run, d, algo, algorithm)
    rollouts = stage.rollouts
    order = [tuple(rollouts.prompt_ids[i]) for r in range(d.world) for i in rollouts.prompts_for(0, r, d.world)]
    real, experience.rollout = experience.rollout, _fixed_rollout(order, group, rollouts.tok)  # every rank's order
    try:
        model = torch.nn.parallel.DistributedDataParallel(stage.ac) if d.world > 1 else stage.ac
        exp, log = collect(stage, 0, d.rank, d.world)
        for batch in next(rollouts.minibatches(exp, 0, d.rank, d.world)):  # the first update's micro-batches
            if own_norm:
                batch["loss_norm"] = batch["answer_mask"].sum().float()
            (stage.algo.loss(model, batch, log) / grad_accum).backward()
    finally:
        experience.rollout = real
    return {n: p.grad.clone() for n, p in stage.ac.named_parameters() if p.grad is not None}


def all_gradients(root: Path, grad_accum: int) -> dict:
    return {(algo, agg): gradients(root, algo, agg, grad_accum) for algo in ("ppo", "grpo") for agg in AGGS}
