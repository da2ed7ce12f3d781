"""Loss aggregation (train/rl_loss.py ``loss_weights``, ``<stage>.loss_agg``): for each of token-mean,
seq-mean-token-mean and seq-mean-token-sum-norm, PPO and GRPO give one minibatch of 8 answers the same
gradients as one micro-batch, as 2 micro-batches of 4 (grad_accum=2), and as 2 ``torchrun`` ranks of 4
(DDP, gloo): the normaliser counts the whole minibatch, on every rank, not each piece.

The answers are fixed, not sampled (tests/builders/rl_gradients.py replaces ``experience.rollout``), so every
way of splitting sees the same 8 answers; the first four are short and the last four long, so a normaliser that
counted each piece's own tokens would give the halves different weights (checked: it fails token-mean by far).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from builders.rl_gradients import ANSWERS, all_gradients, gradients

TESTS = Path(__file__).resolve().parent
TOL = 1e-5  # fp32 round-off, relative to each gradient's largest entry


def worst(a: dict, b: dict) -> float:
    """The largest difference between two sets of gradients, relative to each tensor's largest entry."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a)


TORCHRUN = """
import sys
import torch
sys.path[:0] = [{tests!r}, {root!r}]
from builders.rl_gradients import all_gradients
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
