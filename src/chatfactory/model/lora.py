"""LoRA: low-rank adapters for the fine-tuning stages (SFT, reward, DPO, PPO, GRPO, RLOO).

Hu et al. (2021): a frozen linear ``W`` gets a trainable low-rank update,

    y = W x + b + (alpha / rank) * B A dropout(x),      A: (rank, in) random,  B: (out, rank) zero,

so at step 0 the adapted model computes exactly what the base does, and only A and B (a fraction of a
percent of the weights) train — plus the scalar head of a reward model or critic, which is new anyway.
Adapters are put on from outside the model (``apply_lora`` walks the modules and swaps the targets),
so the model code knows nothing of them.

Configured by the top-level ``lora`` section (config.py ``LoRAConfig``); off while ``lora.rank`` is 0:

    chatfactory sft --out runs/NAME lora.rank=8 lora.alpha=16 lora.dropout=0.05 lora.targets=all
    lora.stages=sft,dpo                         # only these stages use adapters (default: all six)

Targets name our modules: ``attn.qkv`` (q, k and v: one fused matrix), ``attn.proj`` (attention
output), ``mlp.fc`` (SwiGLU's gate and up, fused; GPT-2's up), ``mlp.proj`` (down); the groups ``attn``,
``mlp`` and ``all`` (the default, every linear of every block; the LM head and embeddings never).

**The reference without a second copy.** DPO's and RL's frozen reference is the policy's own base:
``as_reference(policy)`` runs it with its adapters switched off (and in eval mode), which is the base
model bit for bit. A stage uses it when ``ref_from`` is unset; a ``ref_from`` naming another stage
still loads that model.

**Checkpoints.** A LoRA stage's ``model.safetensors`` holds the base weights under their usual names
plus each adapter's ``<module>.lora_A`` and ``<module>.lora_B``; its ``config.json`` records
``"lora": {rank, alpha, dropout, targets}``. So a stage directory is self-contained: resume reloads
base and adapters bit for bit (exact resume, the optimizer holding only the adapters' state);
store/load.py's ``load_model`` merges (W + alpha/rank * B A) into a plain GPT for chat, serve, eval, the
merged ``export`` and a later stage that starts from it (a LoRA PPO after a LoRA SFT adapts the merged
SFT model with adapters of its own, and its reference is that merged SFT model); and
``export --peft DIR`` (formats/hf.py) writes the base as a Hugging Face model and the adapters in PEFT's format.

    settings = lora_settings(cfg, "sft")          # None when the stage trains every weight
    apply_lora(model, settings, seed)             # freezes model, adds trainable adapters in place
    with as_reference(model): ref_logits = model(idx)
    plain = merge_weights(weights, info)          # a checkpoint's tensors -> a plain GPT's
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..stages import names

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
GROUPS = {"attn": TARGETS[:2], "mlp": TARGETS[2:], "all": TARGETS}


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a low-rank update. It keeps the base layer's own ``weight`` and ``bias``
    Parameters (nothing is copied, and state-dict names stay those of the base) and adds ``lora_A``
    and ``lora_B``. ``enabled = False`` makes it the base layer exactly."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        w = base.weight
        a = torch.empty(rank, self.in_features)
        # nn.Linear's own init (PEFT's too), drawn on the CPU from the caller's generator: reproducible
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(w.device, w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.rank, self.scale = rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        h = self.lora_dropout(x) if self.lora_dropout.p else x
        return y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def parse_targets(spec: str) -> list[str]:
    """"attn,mlp.fc" -> ["attn.qkv", "attn.proj", "mlp.fc"] (in model order, no repeats)."""
    chosen = set()
    for name in (s.strip() for s in spec.split(",")):
        if name not in GROUPS and name not in TARGETS:
            raise ValueError(f"lora.targets: unknown target {name!r} (known: {', '.join(TARGETS + tuple(GROUPS))})")
        chosen.update(GROUPS.get(name, (name,)))
    return [t for t in TARGETS if t in chosen]


def lora_settings(cfg, stage: str) -> dict | None:
    """The adapters ``stage`` trains with, checked, as config.json records them; None when ``lora.rank``
    is 0 or ``lora.stages`` leaves the stage out (it then trains every weight)."""
    lc = cfg.lora
    if lc.rank < 0:
        raise ValueError(f"lora.rank must be >= 0 (0 = off), got {lc.rank}")
    stages = [s.strip() for s in lc.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in names(lora=True)]
    if unknown:
        raise ValueError(f"lora.stages: unknown stage(s) {', '.join(map(repr, unknown))} "
                         f"(LoRA serves {', '.join(names(lora=True))})")
    if lc.rank == 0 or stage not in stages:
        return None
    if lc.alpha <= 0:
        raise ValueError(f"lora.alpha must be > 0, got {lc.alpha}")
    if not 0.0 <= lc.dropout < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1), got {lc.dropout}")
    return {"rank": lc.rank, "alpha": lc.alpha, "dropout": lc.dropout, "targets": parse_targets(lc.targets)}


def apply_lora(model: nn.Module, settings: dict, seed: int) -> nn.Module:
    """Freeze every parameter of ``model`` and put an adapter on each target linear (in place; a
    module named ``....attn.qkv`` matches target ``attn.qkv``). A's init comes from ``seed`` alone."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    targets = set(settings["targets"])
    n = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and f"{parent_name.rpartition('.')[2]}.{name}" in targets:
                setattr(parent, name, LoRALinear(child, settings["rank"], settings["alpha"], settings["dropout"], g))
                n += 1
    if n == 0:
        raise ValueError(f"lora.targets={','.join(settings['targets'])}: no such linear in the model")
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its base: every adapter off inside the block (a model without any: unchanged)."""
    on = [m for m in lora_layers(model).values() if m.enabled]
    for m in on:
        m.enabled = False
    try:
        yield model
    finally:
        for m in on:
            m.enabled = True


@contextlib.contextmanager
def as_reference(model: nn.Module):
    """``model`` as the frozen reference of DPO and RL: adapters off and eval mode (a policy in training
    mode would otherwise apply dropout). For a LoRA policy that is its base exactly, with no second copy
    of the weights; a reference model of its own is simply run in eval mode."""
    was = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            yield model
    finally:
        model.train(was)


def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """What an adapter adds to its base weight: scale * B A, in fp32."""
    return (b.float() @ a.float()) * scale


def merge_weights(weights: dict, info: dict) -> dict:
    """A checkpoint's tensors -> those of the plain model: each adapted ``W`` becomes W + scale * B A
    (cast back to W's dtype) and the adapter tensors go. Unchanged when ``info`` records no LoRA."""
    lora = info.get("lora")
    if not lora:
        return weights
    scale = lora["alpha"] / lora["rank"]
    out = {k: v for k, v in weights.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key in weights:
        if key.endswith(".lora_A"):
            name = key[: -len(".lora_A")]
            w = out[name + ".weight"]
            out[name + ".weight"] = (w.float()
                                     + delta_weight(weights[key], weights[name + ".lora_B"], scale)).to(w.dtype)
    return out


def summary(model: nn.Module) -> str:
    """One line for a stage's start: which adapters, and how many weights train."""
    layers = lora_layers(model)
    rank = next(iter(layers.values())).rank if layers else 0
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA rank {rank} on {len(layers)} linears: {train:,} of {total:,} weights train "
            f"({train / max(1, total):.2%})")
