"""Pretraining end to end through the real CLI: learning, exact resume after SIGKILL, torchrun DDP."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from builders.pretrain import SMALL
from conftest import cli_cmd

pytestmark = pytest.mark.slow


def _losses(run):
    rows = [json.loads(x) for x in open(run / "pretrain" / "metrics.jsonl")]
    return ([(r["step"], r["loss"]) for r in rows if "loss" in r],
            [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r])


def test_pretraining_learns_and_samples(tmp_path, seeded_run):
    run = seeded_run(tmp_path / "run")
    out = subprocess.run(cli_cmd("pretrain", "--config", "tiny", "--out", run, *SMALL, "pretrain.steps=60",
                                 "pretrain.eval_every=30"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    train, val = _losses(run)
    assert len(train) == 60 and [s for s, _ in val] == [30, 60]
    assert train[0][1] > 6.0 and val[-1][1] < train[0][1] - 1.0  # from ~ln(512)=6.24 down by > 1 nat
    rows = [json.loads(x) for x in open(run / "pretrain" / "metrics.jsonl")]
    # bits per byte is the loss in bits over the bytes each token spells: 2-5 bytes a token for this BPE
    assert all(0 < r["mfu"] <= 1 for r in rows if "mfu" in r)
    assert 2 < rows[-1]["val_loss"] / math.log(2) / rows[-1]["val_bpb"] < 5, rows[-1]
    s = subprocess.run(cli_cmd("sample", "--run", run, "--prompt", "The", "--max-tokens", "20", "--seed", "1"),
                       capture_output=True, text=True)
    assert s.returncode == 0 and s.stdout.startswith("The") and len(s.stdout) > 10, s.stderr


def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path, seeded_run):
    args = [*SMALL, "pretrain.steps=40", "pretrain.ckpt_every=8", "pretrain.eval_every=10", "pretrain.batch_size=16"]
    ref = seeded_run(tmp_path / "ref")
    # one thread, as the other kill tests: two-thread CPU runs on a busy machine were seen to round
    # differently from run to run (docs/experiment-log.md, 2026-12-01), which is not what this test is about
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cli_cmd("pretrain", "--config", "tiny", "--out", ref, *args), check=True, capture_output=True,
                   env=env)

    run = seeded_run(tmp_path / "killed")
    metrics = run / "pretrain" / "metrics.jsonl"
    kill_after = random.Random().randint(9, 30)  # any moment after the first checkpoint
    proc = subprocess.Popen(cli_cmd("pretrain", "--config", "tiny", "--out", run, *args),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= kill_after:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(run / "pretrain" / "state.pt", weights_only=True)
    assert 8 <= state["step"] < 40, "the kill should land mid-run"
    out = subprocess.run(cli_cmd("pretrain", "--config", "tiny", "--out", run, *args), capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert f"resuming from step {state['step']}" in out.stdout

    a, b = load_file(ref / "pretrain" / "model.safetensors"), load_file(run / "pretrain" / "model.safetensors")
    # bitwise, same host: the resumed run repeats the uninterrupted one's operations (one thread each)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(ref) == _losses(run)  # the whole loss curve, train and validation


def test_torchrun_two_processes_match_one_process(tmp_path, seeded_run):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun should be installed beside python"
    common = [*SMALL, "pretrain.steps=12", "pretrain.eval_every=6", "pretrain.batch_size=4"]
    one = seeded_run(tmp_path / "one")
    subprocess.run(cli_cmd("pretrain", "--config", "tiny", "--out", one, *common, "pretrain.grad_accum=2"),
                   check=True, capture_output=True)
    two = seeded_run(tmp_path / "two")
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "chatfactory.cli", "pretrain",
                          "--config", "tiny", "--out", str(two), *common], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (t1, v1), (t2, v2) = _losses(one), _losses(two)
    assert [s for s, _ in t1] == [s for s, _ in t2] == list(range(1, 13))
    assert max(abs(x - y) for (_, x), (_, y) in zip(t1 + v1, t2 + v2)) < 2e-3
    assert t1[-1][1] < t1[0][1] - 0.5  # and it did learn
