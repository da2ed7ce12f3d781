"""The GPT: a decoder-only Transformer in one file.

Two flavours share one code path:

* ``gpt2``   — learned positions, LayerNorm, GELU (tanh), biases, tied embeddings: exactly Hugging
  Face's ``GPT2LMHeadModel`` (formats/hf.py converts weights both ways).
* ``modern`` — RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied embeddings: exactly
  expressible as Hugging Face's Llama layout, so export is lossless. Three switches cover the imported
  families: ``tie_embeddings`` (SmolLM2, small Qwen2), ``qkv_bias`` (Qwen2) and ``qk_norm`` (Qwen3: an
  RMSNorm on each head's queries and keys before RoPE); with both ``n_head`` and ``head_dim`` given the
  heads may be wider than ``n_embd / n_head`` (Qwen3-0.6B: 16 heads of 128 on a width of 1,024).

One dial sets the size: ``depth`` (number of blocks). Width is ``depth * aspect`` (nanochat's rule),
heads follow from ``head_dim`` (64 wide by default). Any field may still be set by hand.

    from chatfactory.model.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(depth=4, vocab_size=4096))
    logits = model(idx)                       # (B, T, vocab)
    loss = model(idx, targets=targets)        # mean next-token cross-entropy
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    flavour: str = "modern"  # "gpt2" | "modern"
    depth: int = 4  # number of Transformer blocks: the one size dial
    vocab_size: int = 4096
    block_size: int = 256  # longest context the model is trained for (gpt2: size of position table)
    aspect: int = 64  # width = depth * aspect unless n_embd is given
    head_dim: int = 0  # a head's width; 0: n_embd // n_head (set alone, it sets the head count; 64 by default)
    n_embd: int = 0  # 0: derived from depth
    n_head: int = 0  # 0: n_embd // head_dim
    n_kv_head: int = 0  # 0: n_head (no grouping); modern flavour only
    ffn_hidden: int = 0  # 0: 4*d for gpt2, ~8/3*d rounded up to a multiple of 64 for SwiGLU
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool = False  # LM head shares the embedding matrix (always for gpt2; SmolLM2, Qwen2-0.5B)
    qkv_bias: bool = False  # biases on the q/k/v projection (Qwen2); gpt2 has every bias anyway
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3); modern flavour only

    def __post_init__(self):
        if self.flavour not in ("gpt2", "modern"):
            raise ValueError(f"model.flavour must be 'gpt2' or 'modern', got {self.flavour!r}")
        if self.depth < 1:
            raise ValueError(f"model.depth must be >= 1, got {self.depth}")
        if not self.n_embd:
            self.n_embd = self.depth * self.aspect
        if not self.n_head:  # heads of about head_dim (64), then exactly n_embd / n_head wide
            self.n_head, self.head_dim = max(1, self.n_embd // (self.head_dim or 64)), 0
        if not self.head_dim:
            if self.n_embd % self.n_head:
                raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.flavour == "gpt2" and (self.qk_norm or self.n_head * self.head_dim != self.n_embd):
            raise ValueError("qk_norm and heads wider than n_embd / n_head need flavour 'modern'")
        if not self.n_kv_head:
            self.n_kv_head = self.n_head
        if self.flavour == "gpt2":
            self.tie_embeddings = self.qkv_bias = True
        if self.flavour == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError("grouped-query attention (n_kv_head < n_head) needs flavour 'modern'")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}")
        if not self.ffn_hidden:
            if self.flavour == "gpt2":
                self.ffn_hidden = 4 * self.n_embd
            else:  # SwiGLU has three matrices: 8/3*d keeps the parameter count of a 4*d GELU MLP
                self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in fp32, scale by a learned weight (no bias, no mean)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32:  # no casts: a decode step is many tiny ops
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


def rope_cos_sin(head_dim: int, positions: torch.Tensor, theta: float):
    """cos/sin tables for rotary embeddings in Llama's "rotate half" convention.

    positions: (T,) or (B, T) integer tensor -> cos, sin of shape (..., T, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x1, x2, c, s):
    """The pairs (x1, x2) turned by the angles whose cos/sin are c/s: [x1 c - x2 s, x2 c + x1 s]."""
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class _Rope(torch.autograd.Function):
    """The rotation with its backward written out: the gradient is the rotation by minus the angle. The
    same float operations as autograd would run through ``_rotate`` (so the same bits), without the
    zero-filled full-size gradient each half-slice of x costs it (what that saves a small model's training
    step: docs/experiment-log.md, 2026-12-07)."""

    @staticmethod
    def forward(ctx, x, c, s):
        ctx.save_for_backward(c, s)
        h = x.size(-1) // 2
        return _rotate(x[..., :h], x[..., h:], c, s)

    @staticmethod
    def backward(ctx, g):
        c, s = ctx.saved_tensors
        h = g.size(-1) // 2
        return _rotate(g[..., :h], g[..., h:], c, -s), None, None


def apply_rope(x, cos, sin):
    """Rotate x (..., D) by cos/sin tables that broadcast against it: the caller puts their position
    axis where x has its own (e.g. (T, 1, D) for x laid out (B, T, heads, D)). The tables hold each
    angle twice ("rotate half": feature i pairs with i + D/2), so half of each is read."""
    half = x.size(-1) // 2
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    c, s = cos[..., :half], sin[..., :half]
    if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _Rope.apply(x, c, s)
    return _rotate(x[..., :half], x[..., half:], c, s)


class Cache(Protocol):
    """What the model asks of a KV cache (``inference/kv_cache.py`` implements it; callers build it):
    ``start`` once per forward, then ``append`` once per layer, which stores the layer's new keys and
    values and returns every key and value its queries attend over."""

    def start(self, tokens: int) -> int | None:
        """``tokens`` new positions per row: -> the positions each row held before (None where rows differ)."""

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, kv_heads, tokens, head_dim) -> (B, kv_heads, keys, head_dim) each."""


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        # q, k and v in one matmul: one big GEMM is faster than three small ones
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.flavour == "gpt2")
        self.proj.is_residual = True
        if cfg.qk_norm:  # Qwen3: each head's q and k normalised (a weight per feature, shared by the heads)
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, rope=None, cache: Cache | None = None, attn_mask=None):
        B, T, _ = x.shape
        c = self.cfg
        qkv = self.qkv(x).view(B, T, c.n_head + 2 * c.n_kv_head, c.head_dim)
        qk, v = qkv.split([c.n_head + c.n_kv_head, c.n_kv_head], dim=2)
        if c.qk_norm:
            q, k = qk.split([c.n_head, c.n_kv_head], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        if rope is not None:  # q and k rotate together: one set of ops instead of two
            cos, sin = rope
            qk = apply_rope(qk, cos.unsqueeze(-2), sin.unsqueeze(-2))
        q, k = qk.split([c.n_head, c.n_kv_head], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        gqa = c.n_kv_head != c.n_head
        dropout = c.dropout if self.training else 0.0
        if attn_mask is None and T > 1 and k.size(2) == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa)
        else:  # a single decode step sees every cached key; otherwise the caller's mask decides
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.flavour == "modern"
        if self.swiglu:  # gate and up projections fused into one matmul
            self.fc = nn.Linear(cfg.n_embd, 2 * cfg.ffn_hidden, bias=False)
            self.proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)
        else:
            self.fc = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=True)
            self.proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=True)
        self.proj.is_residual = True

    def forward(self, x):
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        norm = ((lambda: nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)) if cfg.flavour == "gpt2"
                else (lambda: RMSNorm(cfg.n_embd, cfg.norm_eps)))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None, attn_mask=None):
        a = self.attn(self.norm1(x), rope, cache, attn_mask)
        x = x + (self.drop(a) if self.drop.p else a)
        m = self.mlp(self.norm2(x))
        return x + (self.drop(m) if self.drop.p else m)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.flavour == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm_f = (nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps) if cfg.flavour == "gpt2"
                       else RMSNorm(cfg.n_embd, cfg.norm_eps))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # tied, as in GPT-2 (and many small modern models)
        self.apply(self._init)

    def _init(self, m):
        # GPT-2 init: N(0, 0.02); residual projections shrunk by 1/sqrt(2*depth) so the residual
        # stream's variance does not grow with depth.
        std = self.cfg.init_std
        if isinstance(m, nn.Linear):
            s = std / math.sqrt(2 * self.cfg.depth) if getattr(m, "is_residual", False) else std
            nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

    # ---- counting ----
    def num_params(self) -> int:
        """Unique parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None, *, head: bool = True, train: bool = True) -> float:
        """Model FLOPs per token of a training step (``train``: forward and backward) or of a forward pass,
        counted as autograd runs them: 2 per weight of a matmul in the forward; in the backward 2 more for
        the gradient of its input wherever that input needs one (a frozen weight still passes the gradient
        down to whatever trains below it) and 2 for the weight's own gradient if it trains. A LoRA layer's
        adapter counts the same way. Attention's q·k and p·v products cost 4 * width * seq_len per token and
        layer forward and twice that backward (the PaLM appendix B convention). Embedding lookups, norms and
        the loss are not matmuls and are left out. ``head``: the LM head runs (a reward model or critic reads
        ``hidden_states`` instead)."""
        t = seq_len or self.cfg.block_size
        total = 0.0

        def trains(*modules) -> bool:
            return train and any(p.requires_grad for m in modules if m is not None for p in m.parameters())

        def linear(m: nn.Linear, needs: bool) -> tuple[float, bool]:
            # -> (its FLOPs, whether its output needs a gradient)
            parts = [(m.weight, needs)]
            lora_a = getattr(m, "lora_A", None)
            if lora_a is not None and getattr(m, "enabled", True):
                parts += [(lora_a, needs), (m.lora_B, needs or (train and lora_a.requires_grad))]
            f, out = 0.0, needs or (train and m.bias is not None and m.bias.requires_grad)
            for w, grad_in in parts:
                f += 2 * w.numel() * (1 + (train and grad_in) + (train and w.requires_grad))
                out = out or (train and w.requires_grad)
            return f, out

        needs = trains(self.tok_emb, self.pos_emb)
        for b in self.blocks:
            f, q = linear(b.attn.qkv, needs or trains(b.norm1))
            total += f + 4 * self.cfg.n_embd * t * (1 + 2 * q)
            f, a = linear(b.attn.proj, q)
            total += f
            needs = needs or a
            f, h = linear(b.mlp.fc, needs or trains(b.norm2))
            total += f
            f, m = linear(b.mlp.proj, h)
            total += f
            needs = needs or m
        if head and self.lm_head is not None:
            total += linear(self.lm_head, needs or trains(self.norm_f))[0]
        return total

    def flops(self, tokens: int, scored: int | None = None, seq_len: int | None = None, *, train: bool = True) -> float:
        """Model FLOPs of ``tokens`` tokens through the blocks, ``scored`` of them (default: all) through the
        LM head too (SFT and DPO run the head only where a target is scored), as ``flops_per_token``."""
        body = self.flops_per_token(seq_len, head=False, train=train)
        head = self.flops_per_token(seq_len, train=train) - body
        return body * tokens + head * (tokens if scored is None else scored)

    # ---- forward ----
    def hidden_states(self, idx, cache: Cache | None = None, positions=None, attn_mask=None):
        """idx: (B, T) token ids -> the final-normed hidden states (B, T, n_embd), before the LM head.

        Heads other than the LM head (the reward model's and the critic's scalar head) read these.
        positions: (T,) or (B, T) position ids; default: after the positions the cache holds (left-padded
        batches, and rows of different lengths, pass their own). attn_mask: bool (B, 1, T, S), True where a
        query may attend to a key (S = cached + new positions); default causal."""
        B, T = idx.shape
        past = cache.start(T) if cache is not None else 0
        if positions is None:
            if past is None:
                raise ValueError("the cache's rows hold different lengths: pass positions")
            positions = torch.arange(past, past + T, device=idx.device)
        if cache is None and T > self.cfg.block_size and self.pos_emb is not None:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.cfg.block_size}")
        if attn_mask is None and past and T > 1:
            # a chunk appended to a filled cache: query i sees every cached key and new keys <= i
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(diagonal=past)
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = rope_cos_sin(self.cfg.head_dim, positions, self.cfg.rope_theta)
        if self.drop.p:
            x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache, attn_mask)
        return self.norm_f(x)

    def forward(self, idx, targets=None, cache: Cache | None = None, positions=None, attn_mask=None,
                ignore_index: int = -100, reduction: str = "mean"):
        """idx: (B, T) token ids; arguments as in ``hidden_states``. With ``targets`` returns the mean
        (or ``reduction="sum"``) cross-entropy over targets != ignore_index; otherwise the logits (B, T, vocab)."""
        h = self.hidden_states(idx, cache, positions, attn_mask)
        if targets is None:
            return self.lm_head(h)
        # the LM head only where a target is scored: SFT masks every non-assistant token, and at a real
        # vocabulary (49k) the head's logits are a fifth of the model's work and most of its memory
        t = targets.reshape(-1)
        keep = t != ignore_index
        logits = self.lm_head(h.reshape(-1, h.size(-1))[keep])
        return F.cross_entropy(logits.float(), t[keep], reduction=reduction)
