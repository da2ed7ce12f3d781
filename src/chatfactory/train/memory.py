"""Memory for models of real size: activation checkpointing and FSDP2, put on from outside the model.

Both are switches of every training stage (``TrainConfig``), applied by the shared loop (loop.py) to
whatever model the stage hands it; model/gpt.py knows nothing of them (torchtitan's way).

* ``activation_checkpointing``: each Transformer block (every model/gpt.py ``Block`` inside the model: a GPT's,
  a reward model's backbone, a critic's) keeps only its input during the forward pass and recomputes
  its activations in the backward pass (``torch.utils.checkpoint``, non-reentrant). The random state is
  replayed, so dropout draws the same masks: gradients are those of the plain run. Costs about one more
  forward pass of the blocks; saves their activations (the bulk of training memory at long context).
  A block run without gradients or with a cache (GRPO's shared-prompt pass) runs as it is.
* ``fsdp`` under ``torchrun``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each block, then
  the root (embeddings, final norm, LM head or scalar head, tied weights together), over all
  processes. Each process holds 1/N of the weights, gradients and AdamW state; a block's weights are
  all-gathered for its forward and backward and freed after. It replaces DDP. Checkpoints are the same
  files as an unsharded run's (``model.safetensors`` whole, ``state.pt`` with the whole optimizer
  state, written by rank 0), so chat/serve/export read them unchanged and a run may resume with or
  without FSDP, on any number of processes. Evaluation gathers the whole weights once (``gathered``),
  so ranks may run different numbers of evaluation batches.

    chatfactory sft --out runs/NAME sft.activation_checkpointing=true
    torchrun --nproc_per_node=8 -m chatfactory.cli sft --out runs/NAME sft.fsdp=true
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every Transformer block inside ``model``, in module order."""
    from ..model.gpt import Block

    return [m for m in model.modules() if isinstance(m, Block)]


# ---------------------------------------------------------------- activation checkpointing
def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of keeping them. In place (the
    block's ``forward`` is wrapped on the instance, so names, state dicts and the decode path that reads
    the blocks' submodules are unchanged); a block already wrapped is left alone. -> blocks wrapped."""
    n = 0
    for block in transformer_blocks(model):
        if "forward" in vars(block):
            continue
        plain = block.forward
        signature = inspect.signature(plain)

        def forward(*args, _plain=plain, _signature=signature, **kwargs):
            # only when a backward will follow, and never with a cache: a recomputation would write it
            # twice (generation's KV cache has no gradients anyway; GRPO's shared-prompt pass keeps
            # keys and values with gradients in one, so those blocks keep their activations)
            if torch.is_grad_enabled() and _signature.bind(*args, **kwargs).arguments.get("cache") is None:
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward
        n += 1
    return n


# ---------------------------------------------------------------- FSDP2
def shard(model: nn.Module, device: torch.device, world: int) -> None:
    """FSDP2 in place: each block, then the root. Parameters on the CPU move to ``device`` block by
    block as they are sharded, so the whole model never has to fit there."""
    mesh = init_device_mesh(device.type, (world,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # the root's weights (LM head) are the first the backward needs: keep them gathered after forward
    fully_shard(model, mesh=mesh, reshard_after_forward=False)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def _sharded(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module):
    """The whole weights on every rank for the duration of the block (one all-gather per sharded
    module), with no collective per forward pass: evaluation may then run a different number of
    batches on each rank. Nothing happens for a model that is not sharded."""
    mods = _sharded(model)
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # as ``shard`` set them


def _whole(t, keep: bool):
    """A DTensor gathered whole (a collective: every rank calls), on the CPU if ``keep``, else None."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().contiguous() if keep else None


def full_weights(model: nn.Module, keep: bool) -> dict:
    """store/checkpoint.py's ``unique_state_dict`` of a sharded model: the same names (tied weights once), each
    tensor whole. Every rank must call; only where ``keep`` (rank 0) are the tensors returned."""
    seen, out = set(), {}
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:  # a tied weight is one Parameter under two names (a DTensor has no data_ptr)
            continue
        seen.add(id(v))
        out[k] = _whole(v, keep)
    return out if keep else {}


def full_optimizer_state(opt: torch.optim.Optimizer, keep: bool) -> dict:
    """``opt.state_dict()`` with every sharded tensor whole: the layout of an unsharded run's, so a
    resume may shard differently or not at all. Every rank must call; rank 0 (``keep``) gets it."""
    sd = opt.state_dict()
    state = {i: {k: _whole(v, keep) if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else {}


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load a whole optimizer state (as ``full_optimizer_state`` or an unsharded run writes it): each
    tensor of a sharded parameter is cut to this rank's shard, the rest load as they are."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            # every rank read the same file: each keeps its own shard, no communication
            s = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                 if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
        state[i] = s
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def grad_norm_value(norm) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (over sharded gradients it is a replicated DTensor)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
