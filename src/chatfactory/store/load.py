"""Loading a stage's model: one ``load_model`` that every caller uses, its decisions explicit arguments
(like gpt-fast's ``_load_model(path, device, precision)``): full precision (LoRA adapters merged or kept),
a quantized stage as it is stored, a full-precision stage quantized on load, or layers streamed from disk.
Every path reads through ``load_checkpoint`` and the stage's one ``SafetensorsFile`` (store/safetensors.py),
so the checkpoint's rules hold on each: the last complete save, model.safetensors and config.json of one
save, a damaged file named. Writing a quantized stage (``quantize_stage``, ``save_quantized``) is here too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..model.gpt import GPT, GPTConfig
from ..model.lora import apply_lora, merge_weights
from ..model.offload import parse_size
from ..model.quant import DEFAULT_GROUP, QuantLinear, parse_spec, quantize_model, release_freed
from .checkpoint import (
    CONFIG,
    MODEL,
    load_checkpoint,
    load_weights,
    resolve_stage,
    save_checkpoint,
    stage_config,
    unique_state_dict,
)
from .files import CheckpointError
from .streamed import stream_model


def model_config(info: dict, stage_dir):
    """The GPTConfig in a stage's config.json (``info``); a bad one is a CheckpointError naming the file."""
    try:
        return GPTConfig.from_dict(info["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(stage_dir) / CONFIG}: bad model config ({e})") from None


def refuse_quantized(info: dict, stage_dir) -> None:
    """A quantized stage is an error where a model is loaded to train: integer weights cannot train."""
    if info.get("quantized"):
        raise CheckpointError(f"{stage_dir}: a quantized stage ({info['quantized'].get('scheme')}), for inference "
                              f"only (chat, sample, serve, eval); train from the stage it was made from "
                              f"({info.get('quantized_from', 'its full-precision stage')})")


def _refuse_requantizing(info: dict, stage_dir, quantize: str, bits: int, group: int | None) -> None:
    """``quantize`` asks for another scheme than the quantized stage's: its fp32 weights are gone."""
    have = info["quantized"]
    if have.get("bits") != bits or group not in (None, have.get("group")):
        g = "" if have.get("bits") == 8 else f" (groups of {have.get('group')})"
        raise ValueError(f"{stage_dir} is an {have.get('scheme')} stage already{g}: --quantize {quantize} "
                         f"cannot requantize it (drop --quantize, or quantize the full-precision stage)")


def load_model(stage_dir, device="cpu", *, inference: bool = False, quantize: str | None = None,
               max_memory: int | str | None = None, merge_lora: bool = True,
               micro_tokens: int | None = 4096) -> tuple[GPT, dict]:
    """-> (the stage's GPT, its config.json).

    By default (training, export) a full-precision GPT: a stage trained with LoRA adapters comes back with
    them merged into its weights, or with ``merge_lora=False`` as its frozen base with the adapters in
    place; a quantized stage is refused. ``inference=True`` (chat, sample, serve, eval, generate): a quantized
    stage loads as it is stored; ``quantize`` ("int8", "int4", "int4:GROUP") quantizes a full-precision
    stage layer by layer as it is read; ``max_memory`` (bytes, or a size such as "300MB") streams what does
    not fit from disk, in micro-batches of ``micro_tokens`` tokens (model/offload.py)."""
    stage_dir = Path(stage_dir)
    if not inference and (quantize or max_memory):
        raise ValueError("quantize= and max_memory= load a model for inference: pass inference=True")
    if not merge_lora and (quantize or max_memory):
        raise ValueError("merge_lora=False keeps a LoRA stage's adapters to train; quantize= and max_memory= "
                         "merge them")
    bits, group = parse_spec(quantize) if quantize else (None, None)
    budget = parse_size(max_memory) if max_memory else None
    if budget is not None and str(device) != "cpu":
        raise ValueError(f"--max-memory streams layers on the CPU only for now (asked for device {device})")
    weights, info, _ = load_checkpoint(stage_dir, lazy=True)  # each tensor read when taken
    if info.get("quantized"):
        if not inference:
            refuse_quantized(info, stage_dir)
        if bits:
            _refuse_requantizing(info, stage_dir, quantize, bits, group)
    if budget is not None:
        if bits and not info.get("quantized"):
            raise ValueError("--quantize with --max-memory: quantize the stage once (chatfactory quantize --run … "
                             "--stage …) and stream the quantized stage, rather than requantizing every streamed "
                             "layer")
        return stream_model(stage_model(info, stage_dir), weights.reader, info, budget, micro_tokens), info
    if info.get("quantized"):
        return stage_model(info, stage_dir, weights, device), info
    cfg = model_config(info, stage_dir)
    if bits:
        weights = merge_weights(dict(weights), info) if info.get("lora") else weights
        return build_quantizing(cfg, weights, stage_dir / MODEL, bits, group or DEFAULT_GROUP, device=device), info
    weights = dict(weights)  # (all of them)
    model = GPT(cfg)
    if info.get("lora") and not merge_lora:
        apply_lora(model, info["lora"], seed=0)  # the init is overwritten by the saved adapters
    else:
        weights = merge_weights(weights, info)
    load_weights(model, weights, str(stage_dir / MODEL))
    return model.to(device).eval(), info


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
    if weights is None:  # store/streamed.py fills it layer by layer
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


def save_quantized(model: GPT, stage_dir, info: dict) -> None:
    """Write a quantized model as a stage: the portable codes in model.safetensors, the scheme in config.json."""
    keep = {k: v for k, v in info.items() if k not in ("lora", "step", "save_id", "quantized")}
    save_checkpoint(stage_dir, unique_state_dict(model), {**keep, "model": model.cfg.to_dict(),
                                                          "quantized": model.quantization})


def quantize_stage(run_dir, stage: str, bits, group: int = DEFAULT_GROUP, out_stage: str | None = None,
                   include_head: bool = False) -> Path:
    """``chatfactory quantize``: the stage's weights (LoRA merged) quantized into RUN/OUT_STAGE."""
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
