"""Loss aggregation (train/rl_loss.py ``loss_weights``, ``<stage>.loss_agg``): for each of token-mean,
seq-mean-token-mean and seq-mean-token-sum-norm, PPO and GRPO give one minibatch of 8 answers the same
gradients as one micro-batch, as 2 micro-batches of 4 (grad_accum=2), and as 2 ``torchrun`` ranks of 4
(DDP, gloo): the normaliser counts the whole minibatch, on every rank, not each piece.

The answers are fixed, not sampled (``experience.rollout`` is replaced), so every way of splitting sees the same
8 answers; the first four are short and the last four long, so a normaliser that counted each piece's
own tokens would give the halves different weights (checked: it fails token-mean by far).
"""

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_ppo import collect, world_fixture  # noqa: F401  (the `world` fixture: the shared tiny run)

from chatfactory.config import Config, GRPOConfig, PPOConfig
from chatfactory.train import experience, rl
from chatfactory.train.grpo import GRPO
from chatfactory.train.loop import setup_dist
from chatfactory.train.ppo import PPO
from chatfactory.train.rl_loss import AGGREGATIONS
from chatfactory.train.rollout import pad_batch

TESTS = Path(__file__).resolve().parent
AGGS = list(AGGREGATIONS)
TOL = 1e-5  # fp32 round-off, relative to each gradient's largest entry

# short answers first, long ones after; a few never end (no <|end|>)
ANSWERS = ["blue", "red", "green blue", "pink", "red blue green pink blue", "green green pink red blue",
           "blue red pink green", "pink pink blue red green"]


def _fixed_rollout(order: list[tuple], group: int, tok):
    """A stand-in for rollout.rollout: the j-th row of the prompt at position p of the iteration's global
    prompt order ``order`` gets ANSWERS[p * group + j], whichever rank asks."""
    def fake(policy, prompts, max_new_tokens, temperature, end_id, pad_id, seed=None, engine=None):
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


def worst(a: dict, b: dict) -> float:
    """The largest difference between two sets of gradients, relative to each tensor's largest entry."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a)


TORCHRUN = """
import sys
import torch
sys.path[:0] = [{tests!r}, {root!r}]
from test_rl_aggregation import all_gradients
from pathlib import Path
grads = all_gradients(Path({root!r}), grad_accum=1)
if torch.distributed.get_rank() == 0:
    torch.save(grads, {out!r})
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_one_batch_two_micro_batches_and_two_ranks_give_the_same_gradients(world, tmp_path):
    root, run, tok = world
    lengths = [len(tok.encode(a)) for a in ANSWERS]
    assert sum(lengths[:4]) * 2 < sum(lengths[4:])  # the halves hold very different numbers of tokens
    one = all_gradients(root, grad_accum=1)
    two_micro = all_gradients(root, grad_accum=2)
    script = tmp_path / "ranks.py"
    script.write_text(TORCHRUN.format(tests=str(TESTS), root=str(root), out=str(tmp_path / "ranks.pt")))
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([exe, "--standalone", "--nproc_per_node=2", str(script)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    two_ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    for key in one:
        assert max(g.abs().max().item() for g in one[key].values()) > 0, key  # a real gradient
        micro, ranks = worst(one[key], two_micro[key]), worst(one[key], two_ranks[key])
        print(f"{key}: 2 micro-batches {micro:.1e}, 2 ranks {ranks:.1e}")
        assert micro <= TOL and ranks <= TOL, key
    # the check has teeth: normalising each micro-batch by its own tokens changes token-mean's gradients
    for algo in ("ppo", "grpo"):
        wrong = gradients(root, algo, "token-mean", grad_accum=2, own_norm=True)
        assert worst(one[algo, "token-mean"], wrong) > 0.1
    # and the three aggregations are three different losses
    assert worst(one["grpo", "token-mean"], one["grpo", "seq-mean-token-mean"]) > 0.01
    assert worst(one["grpo", "seq-mean-token-mean"], one["grpo", "seq-mean-token-sum-norm"]) > 0.01
