"""The engine's fast decode step (``Engine(model, compile=True)``): one token per row, on CPU or GPU.

A small model's decode step on a CPU is bound by memory traffic and op dispatch, not arithmetic, so the
step is ``GPT.forward`` on one token per row rewritten in two forms:

* **compiled** (``torch.compile``, gpt-fast's recipe): static shapes, so inductor fuses the step into
  a few loops. Each layer has its own key/value buffer of a fixed span (``KVCache.buffers(span)``:
  separate tensors, so the in-place write stays in place), the new key/value goes to a slot given as
  a tensor, and attention runs over every slot with a mask hiding later slots and left pads; the
  rotary cos/sin are looked up outside the graph. For up to ``GEMV_MAX_ROWS`` rows a linear is a
  multiply-sum (one loop streaming each weight once) and the span is the whole context where that is
  short (one graph per batch size); for more rows, or weights of ``STREAMED_MIN_BYTES`` and more (they
  stream from memory at every step anyway), a linear is a BLAS product and the span the power of two
  that holds prompt + answer (one graph per batch size and span), so attention reads no idle slots.
  int8/int4 layers (model/quant.py) run their own packed kernels, called inside the graph.
* **packed** (more than ``GEMV_MAX_ROWS`` rows of a model at least ``PACKED_MIN_WIDTH`` wide, on a CPU
  with oneDNN): eager, each linear a oneDNN product on weights reordered once into its blocked layout
  (``torch.compile`` cannot take those as inputs); it writes into the prefill's cache
  (``KVCache.buffers()``) and attends over the filled slots only.

Weights are read from the model at every call (graph inputs, not constants) and the packed copies are
remade when a weight's version counter moves, so the step stays right when the weights change between
generations (RL rollouts). The measurements behind these choices: ``bench/decode_speed.py`` and
docs/benchmarks.md ("The decode step's shape, measured").

    step = DecodeStep(model).begin(cache)   # after a prefill into ``cache`` (a KVCache)
    logits = step(ids, positions)           # (B, vocab); compiles on a batch size's first step

``step_logits`` is the step itself; tests run it uncompiled (``DecodeStep(model, compile=False)``)
against ``GPT.forward``. ``Engine`` falls back to its eager step, with one warning, when compiling
fails (no C++ compiler, an unsupported Python).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.gpt import GPT, apply_rope, rope_cos_sin
from ..model.lora import LoRALinear
from .kv_cache import KVCache

# Batches of up to this many rows take the compiled multiply-sum step on a CPU: one fused loop streaming
# each weight, the cheapest form of a near matrix-vector product; larger ones take BLAS products, which
# reuse each weight across the rows (the figures: docs/benchmarks.md).
GEMV_MAX_ROWS = 2
# Larger batches of models at least this wide take the packed step on a CPU, narrower ones the compiled
# step with BLAS products: oneDNN's packed products pay off on wide matrices, while on narrow ones the
# eager step's many small ops cost more than the compiled step's fused loops.
PACKED_MIN_WIDTH = 256
# Models with at least this many bytes of weights (far past a CPU's last-level cache) stream them from
# memory at every step: BLAS products and power-of-two spans at every batch size.
STREAMED_MIN_BYTES = 128 << 20
# 1-2 rows attend over the whole context (one graph per batch size) only where it is this short: over a long
# one (SmolLM2's 8,192 slots) a step's attention over idle slots costs more than its weights.
WHOLE_SPAN_MAX = 512


def compile_failure(e: Exception) -> str:
    """What torch.compile raised, in one line (dynamo wraps what the compiler raised)."""
    e = getattr(e, "inner_exception", None) or e
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"torch.compile failed ({type(e).__name__}: {first})"


def gemv(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """A linear as multiply-sum: under inductor one loop streaming the weight once (small batches). An int8/int4
    layer (model/quant.py) runs its own kernel, which the graph calls as it is."""
    if not isinstance(layer, nn.Linear):
        return layer(x)
    y = (x.unsqueeze(-2) * layer.weight).sum(-1)
    return y if layer.bias is None else y + layer.bias


def blas(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return layer(x)


def step_logits(model: GPT, ks: list[torch.Tensor], vs: list[torch.Tensor], ids: torch.Tensor,
                positions: torch.Tensor, rope, slot: torch.Tensor, key_valid: torch.Tensor | None,
                linear: Callable[[torch.Tensor, nn.Linear], torch.Tensor], span: int | None = None,
                window: int | None = None) -> torch.Tensor:
    """One token per row through the model -> logits (B, vocab).

    ks[layer], vs[layer]: (B, kv_heads, S, head_dim) buffers; this step's keys/values go to slot
    ``slot``: a 1-element long tensor (every row at one length: the engine) or (B,) (each row at its
    own: the server's continuous batching). Attention sees each row's slots <= its slot where
    ``key_valid`` (B, S) is True (None: all): with ``span`` None over the first ``window`` slots (None:
    all S) through a mask (static shapes, for compiling), with ``span`` = slot + 1 over those slots only
    (eager, one shared slot; there ``key_valid`` None means no pads: no mask, SDPA's fastest path).
    ids, positions: (B, 1). rope: the rotary (cos, sin) of the positions, each (B, 1, 1, head_dim)
    (``DecodeStep.rope``), None for a model with learned positions."""
    cfg = model.cfg
    B, H, G, D = ids.size(0), cfg.n_head, cfg.n_kv_head, cfg.head_dim
    S = window or ks[0].size(2)
    if span is None:
        visible = torch.arange(S, device=ids.device) <= slot.view(-1, 1)  # (B or 1, S)
        if key_valid is not None:
            visible = visible & key_valid[:, :S]
        visible = visible.expand(B, S)[:, None, None, :]  # (B, 1, 1, S)
    else:  # eager: key_valid None when every prompt slot is real (no mask, SDPA's fastest path)
        visible = None if key_valid is None else key_valid[:, None, None, :span]
    # where each row's key goes: (row, head) -> its slot (the server's rows each at their own; the engine's all
    # at one). Written with index_put_, which the compiled graph does in place: scatter_ or index_copy_ into the
    # cache made it copy the whole cache, every layer, every step (docs/experiment-log.md, issue 26)
    rows, heads = torch.arange(B, device=ids.device).view(-1, 1), torch.arange(G, device=ids.device).view(1, -1)
    at = slot.view(-1, 1).expand(B, 1)
    x = model.tok_emb(ids)
    if model.pos_emb is not None:
        x = x + model.pos_emb(positions)
    for layer, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        qkv = linear(block.norm1(x), attn.qkv).view(B, 1, H + 2 * G, D)
        qk = qkv[:, :, : H + G]
        if cfg.qk_norm:  # Qwen3: each head's q and k normalised before RoPE
            qk = torch.cat([attn.q_norm(qk[:, :, :H]), attn.k_norm(qk[:, :, H:])], dim=2)
        if rope is not None:  # q and k rotate together: half the small ops of the eager (packed) step
            qk = apply_rope(qk, *rope)
        q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + G :].transpose(1, 2)
        ks[layer].index_put_((rows, heads, at), k[:, :, 0])
        vs[layer].index_put_((rows, heads, at), v[:, :, 0])
        if span is None:
            # grouped-query attention without repeating keys: the H // G query heads of a key
            # head become that head's rows
            qg = q.reshape(B, G, H // G, D)
            K, V = ks[layer][:, :, :S], vs[layer][:, :, :S]
            scores = (qg @ K.transpose(-1, -2)) * (1.0 / math.sqrt(D))  # (B, G, H // G, S)
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            y = (probs @ V).reshape(B, 1, H * D)
        else:
            y = F.scaled_dot_product_attention(q, ks[layer][:, :, :span], vs[layer][:, :, :span],
                                               attn_mask=visible, enable_gqa=G != H)
            y = y.transpose(1, 2).reshape(B, 1, H * D)
        x = x + linear(y, attn.proj)
        h = linear(block.norm2(x), mlp.fc)
        if mlp.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        x = x + linear(h, mlp.proj)
    return linear(model.norm_f(x), model.lm_head)[:, -1]


class _Packed:
    """oneDNN-packed copies of every linear's weight for one batch size, remade when a weight changes."""

    def __init__(self, model: GPT, batch_size: int):
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.batch_size = batch_size
        self.stamp = None

    def _current(self):
        return [(id(m.weight), _version(m.weight), m.weight.data_ptr()) for m in self.layers]

    def linear(self) -> Callable[[torch.Tensor, nn.Linear], torch.Tensor]:
        if self.stamp != self._current():
            self.packs = {id(m): torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), self.batch_size)
                          for m in self.layers}
            self.stamp = self._current()
        packs = self.packs

        def packed(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, packs[id(layer)], layer.bias, "none", [], "")

        return packed


def span_for(batch_size: int, needed: int, block_size: int, streamed: bool = False) -> int:
    """Key/value slots of the compiled step's buffers: the whole context for 1-2 rows of a model not
    ``streamed`` whose context is at most ``WHOLE_SPAN_MAX`` (one graph per batch size), else the power of
    two >= 32 that holds ``needed`` (one graph per batch and span)."""
    S = block_size
    if batch_size > GEMV_MAX_ROWS or streamed or block_size > WHOLE_SPAN_MAX:
        S = 32
        while S < needed:
            S *= 2
    return min(S, block_size)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version  # moves on every in-place change (optimizer steps, load_state_dict)
    except RuntimeError:  # an inference tensor has no version counter (and no in-place change outside inference mode)
        return -1


class DecodeStep:
    """The step functions of one model; ``begin`` gives one generation its buffers and its step.

    Buffers belong to one generation (two streams of one engine share nothing); the compiled step's
    are allocated zeroed, so a slot not yet written holds zeros, never a stale value that a masked
    softmax weight of 0 could turn into NaN (0 * inf)."""

    def __init__(self, model: GPT, compile: bool = True):
        self.model = model
        # dynamic=False: one graph per batch size, every shape static (inductor's best code). The
        # graphs are cached on ``step_logits`` itself, so later engines over the same model reuse them.
        self.fn = torch.compile(step_logits, dynamic=False, fullgraph=True) if compile else step_logits
        self.packed: dict[int, _Packed] = {}
        self.packed_min_width = PACKED_MIN_WIDTH  # tests set 0 to take the packed step on a small model
        self.streamed_min_bytes = STREAMED_MIN_BYTES  # tests set 0 to take the big-model choices
        # parameters and buffers: an int8/int4 layer's weights are buffers
        self.weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        # int8/int4 layers (model/quant.py) run their own packed kernels, inside the compiled graph as calls (inductor
        # lowers both ops), at every batch size: the packed step's oneDNN copies are for fp32 linears
        self.quantized = any(hasattr(m, "bits") and not isinstance(m, nn.Linear) for m in model.modules())
        cfg, dev = model.cfg, model.tok_emb.weight.device
        self.tables = None if model.pos_emb is not None else rope_cos_sin(
            cfg.head_dim, torch.arange(cfg.block_size, device=dev), cfg.rope_theta)

    def rope(self, positions: torch.Tensor):
        """cos/sin of positions (B, 1) as (B, 1, 1, head_dim) (None for learned positions)."""
        if self.tables is None:
            return None
        if self.tables[0].device != positions.device:  # the model moved after this step was made
            self.tables = tuple(t.to(positions.device) for t in self.tables)
        return tuple(t[positions].unsqueeze(1) for t in self.tables)

    def streamed(self) -> bool:
        """Whether the weights are far larger than a CPU's cache (they stream from memory every step)."""
        return self.weight_bytes >= self.streamed_min_bytes

    def packs(self, batch_size: int) -> bool:
        p = self.model.tok_emb.weight
        return (batch_size > GEMV_MAX_ROWS and self.model.cfg.n_embd >= self.packed_min_width and not self.quantized
                and p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available())

    def begin(self, cache: KVCache, valid: torch.Tensor | None = None):
        """Start decoding after a prefill: ``cache`` holds the prompts' keys/values (``cache.length``
        positions), ``valid`` (B, cache.length) marks real (not pad) prompt tokens, None for all.
        Returns ``step(ids (B, 1), positions (B, 1)) -> logits (B, vocab)``; call i writes slot
        cache.length + i."""
        model, n, dev, B = self.model, cache.length, cache.device, cache.num_rows
        slot = torch.tensor([n], device=dev)
        if self.packs(B):  # eager: it writes into the prefill's own cache and reads its filled part
            linear = self.packed.setdefault(B, _Packed(model, B)).linear()
            ks, vs = cache.buffers()
            mask = None
            if valid is not None:
                mask = torch.ones(B, cache.capacity, dtype=torch.bool, device=dev)
                mask[:, :n] = valid
            span = [n]  # slots filled once this step has written its own, kept on the host

            def step(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                span[0] += 1
                logits = step_logits(model, ks, vs, ids, positions, self.rope(positions), slot, mask, linear, span[0])
                slot.add_(1)
                return logits

            return step

        # compiled: shapes must not depend on the prompt, so the buffers have a fixed span;
        # the prefill's cache is copied, not written, so the engine's eager step can still take over
        streamed = self.streamed()
        S = span_for(B, cache.capacity, model.cfg.block_size, streamed)
        ks, vs = cache.buffers(S)
        key_valid = torch.ones(B, S, dtype=torch.bool, device=dev)
        if valid is not None:
            key_valid[:, :n] = valid
        linear = gemv if B <= GEMV_MAX_ROWS and not streamed else blas

        def step(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            logits = self.fn(model, ks, vs, ids, positions, self.rope(positions), slot, key_valid, linear)
            slot.add_(1)
            return logits

        return step


def slot_logits(*args, **kwargs) -> torch.Tensor:
    """``step_logits`` under its own name: the server's step compiles into a graph cache of its own (a graph per
    row bucket and attention window), apart from the engine's graphs (one per batch size)."""
    return step_logits(*args, **kwargs)


_slot_graphs = [0]  # graphs compiled from slot_logits in this process, by every scheduler (``SlotStep.warm``)
_slot_graphs_lock = threading.Lock()


class SlotStep:
    """The server's decode step (continuous batching, batching.py ``Scheduler(compile=True)``): the slot rows
    of the server's KV cache take one token each, each written at its own length, in one compiled graph.

    Shapes are static. Rows 0..n-1 run, n the highest busy slot + 1 rounded up to a power of two (a *bucket*;
    an idle row among them writes past what it holds and its logits are dropped), and attention reads a *window* of the
    cache, the power of two >= 64 that holds the longest row: a graph per bucket and window, all compiled by
    ``warm`` before the server takes requests. A bucket takes the compiled step where the engine's measurements
    (module docstring) say it wins: up to ``GEMV_MAX_ROWS`` rows, or more rows of a model narrower than
    ``PACKED_MIN_WIDTH``; for the other buckets ``__call__`` returns None and the scheduler runs its eager step.
    Keys and values are written into the cache's own per-layer tensors, so the eager path (prefill, scoring,
    the other buckets) reads them."""

    MIN_WINDOW = 64

    def __init__(self, model: GPT, cache: KVCache, compile: bool = True, engine: DecodeStep | None = None):
        self.model, self.cache = model, cache
        self.fn = torch.compile(slot_logits, dynamic=False, fullgraph=True) if compile else slot_logits
        # the engine's choices (rope tables, streamed, packed rows), from ``engine`` when the caller has one
        engine = engine or DecodeStep(model, compile=False)
        self.rope, self.streamed = engine.rope, engine.streamed()
        self.ks, self.vs = cache.buffers()
        b, self.buckets = 1, []
        while True:
            if not engine.packs(min(b, cache.num_rows)):
                self.buckets.append(min(b, cache.num_rows))
            if b >= cache.num_rows:
                break
            b *= 2

    @classmethod
    def ready(cls, model: GPT, cache: KVCache) -> tuple[SlotStep | None, str]:
        """A step with every graph compiled, or (None, why not) with a warning: a model with LoRA adapters, or a
        compiler that fails."""
        why, engine = "", DecodeStep(model, compile=False)
        if any(isinstance(m, LoRALinear) for m in model.modules()):
            why = "LoRA adapters are not merged into the weights"
        else:
            try:
                step = cls(model, cache, engine=engine)
                step.warm()
                return step, ""
            except Exception as e:  # no C++ compiler, an unsupported Python
                why = compile_failure(e)
        warnings.warn(f"compiled decode step not used: {why}; decoding eagerly", RuntimeWarning, stacklevel=3)
        return None, why

    def window(self, needed: int) -> int:
        w = self.MIN_WINDOW
        while w < needed:
            w *= 2
        return min(w, self.cache.capacity)

    def windows(self) -> list[int]:
        out = [self.window(1)]
        while out[-1] < self.cache.capacity:
            out.append(self.window(out[-1] + 1))
        return out

    def bucket(self, n: int) -> int | None:
        """The compiled row count for rows 0..n-1, or None (the eager step is the faster one there)."""
        b = 1
        while b < n:
            b *= 2
        b = min(b, self.cache.num_rows)
        return b if b in self.buckets else None

    def _run(self, B: int, ids: torch.Tensor, at: torch.Tensor, window: int) -> torch.Tensor:
        linear = gemv if B <= GEMV_MAX_ROWS and not self.streamed else blas
        positions = at.view(-1, 1)
        return self.fn(self.model, [k[:B] for k in self.ks], [v[:B] for v in self.vs], ids, positions,
                       self.rope(positions), at, None, linear, None, window)

    def __call__(self, rows: list[int], tokens: list[int]) -> torch.Tensor | None:
        """Rows ``rows`` (slot indices) decode ``tokens`` -> logits (bucket rows, vocab), the cache one position
        longer on those rows; None (nothing done) when the eager step serves this many rows better."""
        B = self.bucket(max(rows) + 1)
        if B is None:
            return None
        dev = self.cache.device
        ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        ids[rows, 0] = torch.tensor(tokens, device=dev)
        at = self.cache.advance(rows)[:B]  # each row's new position (an idle row's: past what it holds)
        return self._run(B, ids, at, self.window(int(at.max()) + 1))

    @torch.no_grad()
    def warm(self) -> int:
        """Compile every bucket's graph for every window now, on the window's last slot of each row (the server
        holds no row yet): -> the number of graphs."""
        graphs = [(b, w) for b in self.buckets for w in self.windows()]
        # the graphs live in one cache keyed on slot_logits, which every scheduler of the process shares (a
        # hot-swapped version, another model): room for these on top of those already there. Dynamo's settings
        # are each thread's own, so the limit is set here, in the thread that compiles and runs the step
        with _slot_graphs_lock:
            _slot_graphs[0] += len(graphs)
            total = _slot_graphs[0]
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, total + 8)
        dev = self.cache.device
        for b, w in graphs:
            ids = torch.zeros(b, 1, dtype=torch.long, device=dev)
            self._run(b, ids, torch.full((b,), w - 1, dtype=torch.long, device=dev), w)
        return len(graphs)
