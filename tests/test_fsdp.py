"""FSDP2 under torchrun (train/memory.py): two processes sharding one model train like one process.

Each test runs a real ``torchrun --nproc_per_node=2`` (CPU, gloo) with ``<stage>.fsdp=true`` beside a
one-process run that accumulates the same two micro-batches per step, and checks that every logged
loss, gradient norm and validation number agrees to fp32 round-off (``TOL`` relative), that
``model.safetensors`` has the same names, shapes and dtypes (a tied LM head stored once, as today)
with each tensor within ``TOL`` of its largest entry, and that ``state.pt`` is laid out as a
one-process run's (whole optimizer tensors), so chat/serve/export and a later resume read it as
any other. A run cut after a checkpoint resumes under FSDP to the weights of an uninterrupted run,
bit for bit (on one host: the same ranks run the same operations; across the sharded and the one-process
runs, which sum in other orders, only ``TOL``).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from builders import write_jsonl
from builders.preferences import TRAIN_TOPICS, comparison_rows, make_tokenizer
from builders.pretrain import SMALL
from builders.reverse import make_reverse_run, sft_args
from conftest import cli_cmd

pytestmark = pytest.mark.slow

TOL = 1e-5  # fp32 round-off: the sharded run sums the two micro-batches' gradients in another order


# every process on one thread, the single-process side too: a two-thread run on a busy machine rounded
# differently from run to run, and AdamW magnifies that in weights whose gradients are round-off
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, check=True):
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert exe, "torchrun should be installed beside python"
    out = subprocess.run([exe, "--standalone", "--nproc_per_node=2", *map(str, args)], capture_output=True, text=True,
                         timeout=300, env=ONE_THREAD)
    assert out.returncode == 0 or not check, out.stderr[-3000:]
    return out


def rows(stage_dir) -> list[dict]:
    timing = ("tok_s", "mfu", "elapsed")
    return [{k: v for k, v in json.loads(x).items() if k not in timing} for x in open(stage_dir / "metrics.jsonl")]


def assert_trains_alike(one, two) -> tuple[float, float]:
    """``one`` and ``two`` (stage directories) logged the same numbers and saved the same weights, to
    ``TOL``. -> (worst relative difference of a logged number, of a weight tensor)."""
    r1, r2 = rows(one), rows(two)
    assert [sorted(r) for r in r1] == [sorted(r) for r in r2] and [r["step"] for r in r1] == [r["step"] for r in r2]
    logged = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in zip(r1, r2) for k in a if k not in ("step", "lr"))
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert w1.keys() == w2.keys() and all(w1[k].shape == w2[k].shape and w1[k].dtype == w2[k].dtype for k in w1)
    weights = max(((w1[k] - w2[k]).abs().max() / w1[k].abs().max().clamp(min=1e-12)).item() for k in w1)
    print(f"{one.name}: worst relative difference {logged:.1e} in the logged numbers, {weights:.1e} in the weights")
    assert logged <= TOL and weights <= TOL
    s1, s2 = (torch.load(d / "state.pt", weights_only=True)["optimizer"] for d in (one, two))
    assert s1["param_groups"] == s2["param_groups"] and s1["state"].keys() == s2["state"].keys()
    assert all(s1["state"][i][k].shape == s2["state"][i][k].shape for i in s1["state"] for k in s1["state"][i])
    return logged, weights


# cut a run between the checkpoint of step 6 and the next, on every rank
CUT = """
import sys
from chatfactory.cli import main
from chatfactory.train.pretrain import PretrainStage

real = PretrainStage.micro_batch

def dies_at_step_8(self, step, *a, **k):
    if step == 8:
        raise SystemExit(3)
    return real(self, step, *a, **k)

PretrainStage.micro_batch = dies_at_step_8
main(sys.argv[1:])
"""


def test_fsdp_pretraining_matches_one_process_and_resumes(tmp_path, seeded_run):
    """A modern model with tied embeddings (as SmolLM2 has): the tie survives sharding and the save."""
    common = [*SMALL, "model.tie_embeddings=true", "pretrain.steps=12", "pretrain.eval_every=6",
              "pretrain.ckpt_every=6", "pretrain.batch_size=4"]
    one = seeded_run(tmp_path / "one")
    subprocess.run(cli_cmd("pretrain", "--config", "tiny", "--out", one, *common, "pretrain.grad_accum=2"),
                   check=True, capture_output=True, env=ONE_THREAD)
    two = seeded_run(tmp_path / "two")
    torchrun("-m", "chatfactory.cli", "pretrain", "--config", "tiny", "--out", two, *common, "pretrain.fsdp=true")
    assert "lm_head.weight" not in load_file(two / "pretrain" / "model.safetensors")  # tied: stored once
    assert_trains_alike(one / "pretrain", two / "pretrain")

    cut = seeded_run(tmp_path / "cut")
    (tmp_path / "cut.py").write_text(CUT)
    assert torchrun(tmp_path / "cut.py", "pretrain", "--config", "tiny", "--out", cut, *common, "pretrain.fsdp=true",
                    check=False).returncode != 0
    assert json.loads((cut / "pretrain" / "config.json").read_text())["step"] == 6
    out = torchrun("-m", "chatfactory.cli", "pretrain", "--config", "tiny", "--out", cut, *common, "pretrain.fsdp=true")
    assert "resuming from step 6" in out.stdout
    a, b = load_file(two / "pretrain" / "model.safetensors"), load_file(cut / "pretrain" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise, same host: the resume runs the same FSDP operations
    assert rows(two / "pretrain") == rows(cut / "pretrain")  # the whole curve, train and validation


def test_fsdp_sft_with_activation_checkpointing_matches_one_process(tmp_path):
    run, data, _, _ = make_reverse_run(tmp_path, n=300, n_test=20)
    for name in ("one", "two"):
        shutil.copytree(run, tmp_path / name)
    common = sft_args(data, "sft.steps=6", "sft.eval_every=3", "sft.batch_size=4", "sft.ckpt_every=0")
    subprocess.run(cli_cmd("sft", "--out", tmp_path / "one", *common, "sft.grad_accum=2"), check=True,
                   capture_output=True, env=ONE_THREAD)
    torchrun("-m", "chatfactory.cli", "sft", "--out", tmp_path / "two", *common, "sft.fsdp=true",
             "sft.activation_checkpointing=true")
    assert_trains_alike(tmp_path / "one" / "sft", tmp_path / "two" / "sft")


def test_fsdp_reward_model_and_lora_dpo_match_one_process(tmp_path):
    """The reward model (a backbone without LM head, plus a scalar head) shards the same way; its
    score calibration after training runs on every rank and lands in the saved head. DPO with LoRA:
    frozen base weights and trainable adapters in one shard group, the reference being the sharded
    policy with its adapters off."""
    from chatfactory.model.gpt import GPT, GPTConfig
    from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict

    base = tmp_path / "base"
    base.mkdir()
    tok = make_tokenizer(base / "tokenizer.json")
    torch.manual_seed(0)
    mcfg = GPTConfig(depth=2, n_embd=64, n_head=2, vocab_size=tok.vocab_size, block_size=64, tie_embeddings=True)
    save_checkpoint(base / "sft", unique_state_dict(GPT(mcfg)), {"stage": "sft", "model": mcfg.to_dict()})
    data = write_jsonl(tmp_path / "c.jsonl", comparison_rows(96, TRAIN_TOPICS, 3))
    for name in ("one", "two"):
        shutil.copytree(base, tmp_path / name)
    common = [f"reward.data={data}", "reward.steps=6", "reward.batch_size=4", "reward.seq_len=64", "reward.lr=1e-3",
              "reward.eval_every=3", "reward.progress=false", "reward.device=cpu", "reward.val_fraction=0.25",
              "reward.calib_pairs=32"]
    subprocess.run(cli_cmd("reward", "--config", "tiny", "--out", tmp_path / "one", *common, "reward.grad_accum=2"),
                   check=True, capture_output=True, env=ONE_THREAD)
    torchrun("-m", "chatfactory.cli", "reward", "--config", "tiny", "--out", tmp_path / "two", *common,
             "reward.fsdp=true")
    # the saved weights are after calibration; the shifts themselves may differ by more than TOL: the
    # pairwise loss gives the head's bias no gradient, so Adam moves it by amplified round-off, which
    # the calibration then takes out
    assert_trains_alike(tmp_path / "one" / "reward", tmp_path / "two" / "reward")
    info = [json.loads((tmp_path / n / "reward" / "config.json").read_text()) for n in ("one", "two")]
    assert all(i["kind"] == "reward" and i["bias_shift"] != 0 for i in info)

    common = [a.replace("reward.", "dpo.") for a in common if "calib" not in a] + ["lora.rank=4"]
    subprocess.run(cli_cmd("dpo", "--config", "tiny", "--out", tmp_path / "one", *common, "dpo.grad_accum=2"),
                   check=True, capture_output=True, env=ONE_THREAD)
    torchrun("-m", "chatfactory.cli", "dpo", "--config", "tiny", "--out", tmp_path / "two", *common, "dpo.fsdp=true",
             "dpo.activation_checkpointing=true")
    assert_trains_alike(tmp_path / "one" / "dpo", tmp_path / "two" / "dpo")
