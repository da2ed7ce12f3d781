"""Activation checkpointing, the FSDP2 switch's refusals, and bf16 autocast, in one process (train/memory.py).

Activation checkpointing must change nothing but memory: the same loss and bit-identical gradients
as the plain model, dropout included (the random state is replayed), through ``model(...)`` and
through ``hidden_states`` (the reward model's and critic's path), and generation with a KV cache
untouched. The two-process FSDP2 parity runs are in test_fsdp.py.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from chatfactory.config import TrainConfig
from chatfactory.inference.kv_cache import KVCache
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.train import memory
from chatfactory.train.loop import Dist, Stage, autocast_for, train, use_fsdp
from chatfactory.train.reward import RewardModel

SIZES = dict(depth=3, n_embd=64, head_dim=16, vocab_size=101, block_size=32)


def _models(**kw):
    """Two identical models, the second with checkpointed blocks."""
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SIZES, **kw))
    ckpt = GPT(GPTConfig(**SIZES, **kw))
    ckpt.load_state_dict(plain.state_dict())
    assert memory.checkpoint_blocks(ckpt) == SIZES["depth"]
    return plain, ckpt


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the dropout masks
    loss = fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [dict(flavour="gpt2", dropout=0.1),
                                dict(flavour="modern", tie_embeddings=True, n_kv_head=2, dropout=0.1)],
                         ids=["gpt2", "modern-tied-gqa"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(kw):
    plain, ckpt = _models(**kw)
    x = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(2))
    (la, ga), (lb, gb) = (_grads(m, lambda m: m(x, targets=x)) for m in (plain, ckpt))
    # bitwise on any host, here and below: checkpointing recomputes the same forward (the same kernels on the same
    # shapes, the same dropout masks) and the backward runs the same operations
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
    assert plain.state_dict().keys() == ckpt.state_dict().keys()  # names (and so checkpoints) unchanged


def test_checkpointed_blocks_through_hidden_states():
    """The reward model and PPO's critic read ``backbone.hidden_states`` under a packed mask."""
    plain, ckpt = _models(dropout=0.1)
    torch.manual_seed(3)
    rm_plain = RewardModel(plain)
    rm_ckpt = RewardModel(ckpt)
    rm_ckpt.head.load_state_dict(rm_plain.head.state_dict())
    x = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(32, 32, dtype=torch.bool).tril()[None, None].expand(4, 1, 32, 32)
    (la, ga), (lb, gb) = (_grads(m, lambda m: m.values(x, attn_mask=mask).square().mean()) for m in (rm_plain, rm_ckpt))
    assert torch.equal(la, lb) and all(torch.equal(ga[n], gb[n]) for n in ga)


def test_checkpointed_blocks_leave_generation_alone():
    """Without gradients (evaluation, rollouts) the blocks run as they are: a KV cache is written once."""
    plain, ckpt = _models()
    x = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(5))
    outs = []
    for m in (plain, ckpt):
        m.eval()
        cache = KVCache.for_model(m, 2, 16)
        with torch.no_grad():
            first = m(x, cache=cache)
            step = m(x[:, -1:], cache=cache)
        outs.append((first, step, cache.length))
    assert (torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
            and outs[0][2] == outs[1][2] == 11)
    assert memory.checkpoint_blocks(ckpt) == 0  # already wrapped: nothing wrapped twice


class _Tokens(Stage):
    """Next-token prediction on random ids, a pure function of the step."""
    name = "pretrain"

    def __init__(self, model_config):
        self.model_config = model_config

    def micro_batch(self, step, micro, rank, world):
        x = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(step * 100 + micro))
        return x, x.roll(-1, 1)

    def loss(self, model, batch):
        return model(batch[0], targets=batch[1])

    def token_count(self, batch):
        return batch[0].numel()


def _trained(tmp_path, name, **cfg):
    torch.manual_seed(0)
    mcfg = GPTConfig(**SIZES, tie_embeddings=True, dropout=0.1)
    model = GPT(mcfg)
    tc = TrainConfig(steps=4, grad_accum=2, lr=1e-2, warmup_steps=1, eval_every=0, ckpt_every=0, progress=False,
                     device="cpu", **cfg)
    res = train(_Tokens(mcfg.to_dict()), model, tc, tmp_path / name)
    return res, model


def test_training_with_activation_checkpointing_equals_plain_training(tmp_path):
    (ra, a), (rb, b) = _trained(tmp_path, "plain"), _trained(tmp_path, "ckpt", activation_checkpointing=True)
    assert ra["loss"] == rb["loss"]  # bitwise, any host: the same operations, recomputed
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bf16_autocast_trains_a_tied_modern_model(tmp_path):
    """dtype=auto means bf16 autocast on CUDA, for imported (modern, tied) models as for ours; the weights
    stay fp32 (the optimizer's master copy). Checked here on the CPU's bf16 autocast."""
    with warnings.catch_warnings():  # without CUDA torch warns that it disables this context
        warnings.simplefilter("ignore")
        amp = autocast_for(Dist(device=torch.device("cuda")), "auto")
    assert isinstance(amp, torch.autocast) and amp.device == "cuda" and amp.fast_dtype == torch.bfloat16
    assert not isinstance(autocast_for(Dist(), "auto"), torch.autocast)  # CPU: fp32, as before
    (r32, _), (r16, m16) = _trained(tmp_path, "fp32"), _trained(tmp_path, "bf16", dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    assert m16.lm_head.weight is m16.tok_emb.weight
    assert abs(r16["loss"] - r32["loss"]) < 0.05 * r32["loss"]


class _Custom(_Tokens):
    def checkpoint_weights(self, model):
        return {}, {}


def test_fsdp_switch_refuses_what_it_cannot_shard(capsys):
    from chatfactory.train.rl import RLStage

    on = TrainConfig(fsdp=True)
    for name in ("ppo", "grpo"):
        stage = RLStage.__new__(RLStage)  # the refusal needs no more than the stage's name
        stage.name = name
        with pytest.raises(ValueError,
                           match=rf"{name}.fsdp=true: the {name} stage cannot train under FSDP2: each rank samples"):
            use_fsdp(stage, on, Dist())
    with pytest.raises(ValueError, match=r"pretrain.fsdp=true: .*checkpoint_weights"):
        use_fsdp(_Custom({}), on, Dist())
    assert use_fsdp(_Tokens({}), TrainConfig(), Dist(world=2)) is False
    assert use_fsdp(_Tokens({}), on, Dist()) is False  # one process: unsharded, with a note
    assert "pretrain.fsdp=true with one process: training unsharded" in capsys.readouterr().out


PEAK = """
import sys, torch
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.train import memory
torch.manual_seed(0)
m = GPT(GPTConfig(depth=6, aspect=48, head_dim=48, vocab_size=4096, block_size=256))
if sys.argv[1] == "on":
    memory.checkpoint_blocks(m)
x = torch.randint(0, 4096, (4, 256))
m(x, targets=x).backward()  # gradients allocated, as in training
rss = lambda f: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(f)) / 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current size
base = rss("VmRSS")
m(x, targets=x).backward()
print(rss("VmHWM") - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_activation_checkpointing_cuts_peak_memory():
    """Peak resident memory of a training forward + backward above the resting size (weights and
    gradients), measured in a fresh process each: checkpointing keeps far less."""
    peak = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", PEAK, mode], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        peak[mode] = float(out.stdout)
    print(f"activation memory: {peak['off']:.0f} MB plain, {peak['on']:.0f} MB checkpointed")
    assert peak["on"] < 0.5 * peak["off"]


@pytest.mark.parametrize("group", [1, 4])
def test_checkpointed_blocks_in_rl_forwards(group):
    """PPO's and GRPO's training forward over a rollout batch; with groups (GRPO) the prompt runs once
    and its keys/values reach the answers through a cache that carries gradients."""
    from chatfactory.train.rollout import forward_answers, pad_batch

    plain, ckpt = _models(n_kv_head=2)
    g = torch.Generator().manual_seed(6)
    prompts = [x for n in (4, 7) for x in [torch.randint(3, 101, (n,), generator=g).tolist()] * 4]
    answers = [torch.randint(3, 101, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in prompts]
    batch = {**pad_batch(prompts, answers, pad_id=0, end_id=1), "group": group}
    (la, ga), (lb, gb) = (_grads(m, lambda m: (forward_answers(m, batch).log_softmax(-1)[..., 5]
                                               * batch["answer_mask"]).sum())
                          for m in (plain, ckpt))
    assert torch.equal(la, lb) and all(torch.equal(ga[n], gb[n]) for n in ga)
