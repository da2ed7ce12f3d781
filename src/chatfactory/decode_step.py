"""One decode step with static shapes, written for ``torch.compile`` (the engine's opt-in fast path).

On a CPU at small batch a decode step of a small model is not arithmetic-bound. Measured on a 2-core
AMD EPYC (depth 4, width 256, vocab 4096, batch 1): MKL's matrix-vector products stream the weights
at ~6 GB/s where a plain sum over the same bytes reaches ~30 GB/s, and ~40 small dispatched ops add
the rest. This step is the same computation as ``GPT.forward`` on one token per row, written so that
inductor compiles the whole of it into a few fused C++ loops (gpt-fast's recipe):

* shapes never change from one step to the next: each layer has its own key/value buffer spanning
  the whole context (separate tensors, so the in-place write stays in place instead of copying a
  shared base), the new key/value is written at a slot given as a tensor, and attention runs over
  every slot with a mask (slots past the current one and left pads are hidden). One compiled graph
  serves every step of a generation, and every later generation of the same batch size;
* at small batch a linear is written as broadcast-multiply-sum, which inductor emits as one
  vectorised reduction streaming each weight matrix once (fused with its bias and what follows);
  larger batches keep the matrix multiply (BLAS wins once a weight is reused across rows);
* attention is matmul, masked softmax, matmul: CPU's fused attention kernel costs more than the
  work for one query against a few hundred keys.

The weights are read from the model at every call (graph inputs, not constants folded in at compile
time), so the step stays right when the weights change between generations (RL rollouts).

    step = DecodeStep(model).begin(cache)         # after a prefill into ``cache`` (a KVCache)
    logits = step(ids, positions)                 # (B, vocab); compiles on a batch size's first step

``step_logits`` is the uncompiled function (tests compare it with ``GPT.forward``); the engine's
``Engine(model, compile=True)`` drives all of this and falls back to its eager step with a one-line
warning when compiling fails (no C++ compiler, an unsupported Python).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import GPT, KVCache, apply_rope, rope_cos_sin

# Up to this many rows a linear is a multiply-sum (one pass over the weights); above it, BLAS.
GEMV_MAX_ROWS = 4


def _linear(x: torch.Tensor, layer: torch.nn.Linear, gemv: bool) -> torch.Tensor:
    if not gemv:
        return layer(x)
    y = (x.unsqueeze(-2) * layer.weight).sum(-1)  # (..., out): inductor fuses this into one loop
    return y if layer.bias is None else y + layer.bias


def step_logits(model: GPT, ks: list[torch.Tensor], vs: list[torch.Tensor], ids: torch.Tensor,
                positions: torch.Tensor, slot: torch.Tensor, key_valid: torch.Tensor, gemv: bool) -> torch.Tensor:
    """One token per row through the model -> logits (B, vocab).

    ks[layer], vs[layer]: (B, kv_heads, S, head_dim) buffers; this step's keys/values go to slot
    ``slot`` (a 1-element long tensor) and it attends to slots <= slot where ``key_valid`` (B, S)
    is True. ids, positions: (B, 1)."""
    cfg = model.cfg
    B, H, G, D = ids.size(0), cfg.n_head, cfg.n_kv_head, cfg.head_dim
    S = ks[0].size(2)
    visible = (key_valid & (torch.arange(S, device=ids.device) <= slot))[:, None, None, :]  # (B, 1, 1, S)
    x = model.tok_emb(ids)
    rope = None
    if model.pos_emb is not None:
        x = x + model.pos_emb(positions)
    else:
        rope = rope_cos_sin(D, positions, cfg.rope_theta)
    for layer, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        q, k, v = _linear(block.norm1(x), attn.qkv, gemv).split([H * D, G * D, G * D], dim=-1)
        q = q.view(B, 1, H, D).transpose(1, 2)
        k = k.view(B, 1, G, D).transpose(1, 2)
        v = v.view(B, 1, G, D).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        ks[layer].index_copy_(2, slot, k)
        vs[layer].index_copy_(2, slot, v)
        # grouped-query attention without repeating keys: the H // G query heads of a key head
        # become that head's rows
        qg = q.reshape(B, G, H // G, D)
        scores = (qg @ ks[layer].transpose(-1, -2)) * (1.0 / math.sqrt(D))  # (B, G, H // G, S)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        y = (probs @ vs[layer]).reshape(B, 1, H * D)
        x = x + _linear(y, attn.proj, gemv)
        h = _linear(block.norm2(x), mlp.fc, gemv)
        if mlp.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        x = x + _linear(h, mlp.proj, gemv)
    return _linear(model.norm_f(x), model.lm_head, gemv)[:, -1]


class DecodeStep:
    """The compiled step; ``begin`` gives one generation its own static buffers and step function.

    Buffers belong to one generation (nothing is shared between two streams of one engine); they are
    allocated zeroed, so slots not yet written hold zeros, never a stale value that a masked softmax
    weight of 0 could turn into NaN (0 * inf)."""

    def __init__(self, model: GPT, compile: bool = True):
        self.model = model
        # dynamic=False: one graph per batch size, every shape static (inductor's best code). The
        # graphs are cached on ``step_logits`` itself, so later engines over the same model reuse them.
        self.fn = torch.compile(step_logits, dynamic=False, fullgraph=True) if compile else step_logits

    def begin(self, cache: KVCache, valid: torch.Tensor | None = None):
        """Start decoding after a prefill: ``cache`` holds the prompts' keys/values (``cache.pos``
        positions), ``valid`` (B, cache.pos) marks real (not pad) prompt tokens, None for all.
        Returns ``step(ids (B, 1), positions (B, 1)) -> logits (B, vocab)``; call i writes slot
        cache.pos + i."""
        model, n = self.model, cache.pos
        B, length = cache.k.size(1), model.cfg.block_size
        ks, vs = [], []
        for layer in range(model.cfg.depth):
            for bufs, src in ((ks, cache.k), (vs, cache.v)):
                buf = src.new_zeros(B, src.size(2), length, src.size(4))
                buf[:, :, :n] = src[layer, :, :, :n]
                bufs.append(buf)
        key_valid = torch.ones(B, length, dtype=torch.bool, device=cache.k.device)
        if valid is not None:
            key_valid[:, :n] = valid
        slot = torch.tensor([n], device=cache.k.device)
        gemv = B <= GEMV_MAX_ROWS

        def step(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            logits = self.fn(model, ks, vs, ids, positions, slot, key_valid, gemv)
            slot.add_(1)
            return logits

        return step
