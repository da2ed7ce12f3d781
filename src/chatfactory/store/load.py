"""Loading a stage's model for use: full precision (LoRA adapters merged or kept), a quantized stage as
it is stored, a full-precision stage quantized on load, or layers streamed from disk.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from ..model.gpt import GPT, GPTConfig
from ..model.lora import apply_lora, merge_weights
from ..model.quant import DEFAULT_GROUP, QuantLinear, parse_spec, quantize_model, release_freed
from .checkpoint import (
    CONFIG,
    MODEL,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    stage_config,
    unique_state_dict,
)
from .files import CheckpointError

# Set by ``quant.inference()`` for inference commands: ``quantized_loader(weights, info, stage_dir, device)`` builds
# a quantized stage's model, ``quantize_on_load(cfg, weights, stage_dir / MODEL, device)`` (--quantize) a full-precision
# one quantized, both on the meta device from ``LazyWeights``; unset (training), a quantized stage is refused. Set
# by ``offload.streaming()`` (--max-memory): ``stream_loader(stage_dir, device)`` streams what does not fit.
quantized_loader = quantize_on_load = stream_loader = None


def model_config(info: dict, stage_dir):
    """The GPTConfig in a stage's config.json (``info``); a bad one is a CheckpointError naming the file."""
    try:
        return GPTConfig.from_dict(info["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(stage_dir) / CONFIG}: bad model config ({e})") from None


def refuse_quantized(info: dict, stage_dir) -> None:
    """Outside ``quant.inference()`` (training) a quantized stage is an error: integer weights cannot train."""
    if info.get("quantized") and quantized_loader is None:
        raise CheckpointError(f"{stage_dir}: a quantized stage ({info['quantized'].get('scheme')}), for inference only "
                              "(chat, sample, serve, eval); train from the stage it was made from "
                              f"({info.get('quantized_from', 'its full-precision stage')})")


def load_model(stage_dir, device="cpu", merge_lora: bool = True):
    """-> (GPT with the stage's weights, the checkpoint's config.json). A stage trained with LoRA
    adapters (train/lora.py) comes back as a plain GPT with the adapters merged into its weights, or
    with ``merge_lora=False`` as its frozen base with the adapters in place."""
    if stream_loader is not None:
        return stream_loader(stage_dir, device)
    weights, info, _ = load_checkpoint(stage_dir, lazy=quantized_loader is not None)
    refuse_quantized(info, stage_dir)
    if info.get("quantized"):
        return quantized_loader(weights, info, stage_dir, device), info
    cfg = model_config(info, stage_dir)
    if quantize_on_load is not None and (merge_lora or not info.get("lora")):
        weights = merge_weights(dict(weights), info) if info.get("lora") else weights
        return quantize_on_load(cfg, weights, Path(stage_dir) / MODEL, device), info
    weights = dict(weights)  # (all of them: a lazy read ends here)
    model = GPT(cfg)
    if info.get("lora") and not merge_lora:
        apply_lora(model, info["lora"], seed=0)  # the init is overwritten by the saved adapters
    else:
        weights = merge_weights(weights, info)
    load_weights(model, weights, str(Path(stage_dir) / MODEL))
    model = model.to(device).eval()
    return model, info


# ---------------------------------------------------------------- stages on disk
def stage_model(info: dict, where, weights: dict | None = None, device="cpu") -> GPT:
    """A stage's GPT built on the meta device, quantized as its config says; ``weights`` become its tensors as
    they are."""
    q = info.get("quantized")
    with torch.device("meta"):
        model = GPT(model_config(info, where))
        try:
            if q:
                quantize_model(model, q["bits"], int(q.get("group") or DEFAULT_GROUP), bool(q.get("include_head")),
                               empty=True, layer_bits=q.get("layer_bits"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{Path(where) / 'config.json'}: bad quantization config ({e})") from None
    if weights is None:  # offload.py fills it layer by layer
        return model
    load_assigned(model, weights, str(Path(where) / "model.safetensors"))
    return model.to(device).eval()


def build_quantizing(cfg: GPTConfig, weights: dict, where, bits, group: int = DEFAULT_GROUP,
                     include_head: bool = False, device="cpu") -> GPT:
    """Quantize on load (``--quantize``): the GPT built on the meta device, each linear quantized from its fp32
    weight as it is read (with ``checkpoint.LazyWeights`` the fp32 model is never whole in memory)."""
    with torch.device("meta"):
        model = GPT(cfg)
    try:
        quantize_model(model, bits, group, include_head, weights=weights)
    except KeyError as e:
        raise CheckpointError(f"{where}: weights do not fit the model (missing {e})") from None
    load_assigned(model, weights, str(where))
    return model.to(device).eval()


def load_assigned(model: GPT, weights: dict, where: str) -> None:
    """Load a model built on the meta device: its tensors become those of ``weights`` (taken out of the dict as
    it goes), a tied head is tied again, and a tensor left on the meta device is an error naming it."""
    errors = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):  # one layer at a time: its (aligned) copy replaces the file's tensors
            mine = {k[len(name) + 1:]: weights.pop(k) for k in [k for k in weights if k.startswith(name + ".")]}
            m._load_from_state_dict(mine, "", {}, True, [], [], errors)
            release_freed()
    if errors:
        raise CheckpointError(f"{where}: " + "; ".join(errors))
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    weights.clear()
    if model.cfg.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.tok_emb.weight  # assign replaced tok_emb's parameter: tie the head to it again
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unexpected or left:
        raise CheckpointError(f"{where}: weights do not fit the model "
                              f"(missing {sorted(set(missing) & set(left)) or left}, unexpected {unexpected})")


def load_quantized(stage_dir, device="cpu") -> tuple[GPT, dict]:
    """-> (the quantized GPT of a stage written by ``save_quantized``, its config.json)."""
    weights, info, _ = load_checkpoint(stage_dir, lazy=True)
    if not info.get("quantized"):
        raise CheckpointError(f"{stage_dir}: not a quantized stage "
                              "(quantize it: chatfactory quantize --run … --stage …)")
    return stage_model(info, stage_dir, weights, device), info


def save_quantized(model: GPT, stage_dir, info: dict) -> None:
    """Write a quantized model as a stage: the portable codes in model.safetensors, the scheme in config.json."""
    keep = {k: v for k, v in info.items() if k not in ("lora", "step", "save_id", "quantized")}
    save_checkpoint(stage_dir, unique_state_dict(model), {**keep, "model": model.cfg.to_dict(),
                                                          "quantized": model.quantization})


def quantize_stage(run_dir, stage: str, bits, group: int = DEFAULT_GROUP, out_stage: str | None = None,
                   include_head: bool = False) -> Path:
    """``chatfactory quantize``: the stage's weights (LoRA merged) quantized into RUN/OUT_STAGE."""
    from ..store.checkpoint import load_model, resolve_stage

    if str(bits) not in ("4", "8"):
        raise ValueError(f"--bits {bits}: only 8 (int8, per output channel) and 4 (int4, group-wise) are supported")
    src = resolve_stage(run_dir, stage, "--stage")
    if stage_config(src).get("quantized"):
        raise ValueError(f"--stage {stage}: {src} is quantized already; quantize the full-precision stage it came from")
    model, info = load_model(src)
    quantize_model(model, bits, group, include_head)
    out = Path(run_dir) / (out_stage or f"{Path(stage).name}-int{bits}")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out-stage {out_stage}: would overwrite the stage it quantizes; name another")
    save_quantized(model, out, {**info, "quantized_from": str(stage)})
    return out


@contextlib.contextmanager
def inference(quantize: str | None = None):
    """For inference commands (chat, sample, serve, eval): within it ``checkpoint.load_model`` loads
    quantized stages, and quantizes full-precision ones on load when ``quantize`` ("int8"/"int4") is
    given ("int4:64": groups of 64 columns; default 32). Outside it a quantized stage is refused (training
    cannot update integer weights)."""
    bits, group = parse_spec(quantize) if quantize else (None, None)
    global quantized_loader, quantize_on_load
    old = quantized_loader, quantize_on_load

    def load(weights, info, where, device):
        have = info["quantized"]
        if bits and (have.get("bits") != bits or group not in (None, have.get("group"))):
            g = "" if have.get("bits") == 8 else f" (groups of {have.get('group')})"
            raise ValueError(f"{where} is an {have.get('scheme')} stage already{g}: --quantize {quantize} "
                             f"cannot requantize it (drop --quantize, or quantize the full-precision stage)")
        return stage_model(info, where, weights, device)

    quantized_loader = load
    quantize_on_load = (lambda cfg, weights, where, device: build_quantizing(
        cfg, weights, where, bits, group or DEFAULT_GROUP, device=device)) if bits else None
    try:
        yield
    finally:
        quantized_loader, quantize_on_load = old
