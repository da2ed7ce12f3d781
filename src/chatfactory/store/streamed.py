"""A stage opened with its layers streamed from disk (``load_model(..., max_memory=)``): the storage side
of model/offload.py.

``load_model`` reads the stage like any other (``load_checkpoint``: the last complete save, save ids
agreeing, a bad file named) and builds its GPT on the meta device; here the plan decides what fits the
budget, what fits is read in once, and the rest is handed to the runtime (``Prefetcher``, ``ScheduledBlock``,
``DiskEmbedding``, ``StreamedHead``) with a loader reading from the same open ``SafetensorsFile``, so every
streamed layer comes from the save that was checked.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn as nn

from ..model.gpt import GPT
from ..model.lora import delta_weight
from ..model.offload import SLOTS, DiskEmbedding, Prefetcher, ScheduledBlock, StreamedHead, mb, plan
from ..model.quant import QuantLinear
from .safetensors import SafetensorsFile


def materialize(module: nn.Module, reader: SafetensorsFile, prefix: str, lora_scale: float = 0.0) -> None:
    """Give a meta-device (or slot) module the weights stored under ``prefix``, in place: its tensors are
    read straight into its own storage; int4 QuantLinears get their codes packed for the kernel; a LoRA
    stage's adapters are merged with the ops model/lora.py's ``merge_weights`` uses, so the bits are those
    of a resident load."""
    for name, m in module.named_modules():
        p = prefix + (name + "." if name else "")
        if isinstance(m, QuantLinear) and m.bits == 4:
            got = {k: reader.read(p + k) for k in ("qweight", "scales", "offsets")}
            if m.bias is not None:
                m.bias = reader.read(p + "bias")
            m.qweight = got["qweight"]  # set_portable keeps qweight's device: the CPU, not meta
            m.set_portable(got["qweight"], got["scales"], got["offsets"])
            continue
        for tname, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t.is_meta:
                t = torch.empty(t.shape, dtype=t.dtype)
                if tname in m._parameters:
                    m._parameters[tname] = nn.Parameter(t, requires_grad=False)
                else:
                    m._buffers[tname] = t
            reader.read_into(p + tname, t.data)
            if tname == "weight" and p + "lora_A" in reader:
                delta = delta_weight(reader.read(p + "lora_A"), reader.read(p + "lora_B"), lora_scale)
                t.data.copy_((t.data.float() + delta).to(t.dtype))
        if isinstance(m, QuantLinear):
            m.relayout()  # built on meta it chose the plain layout; also drops the old scales' bf16 copy


def stream_model(model: GPT, reader: SafetensorsFile, info: dict, budget: int, micro_tokens: int | None = 4096,
                 slots: int = SLOTS) -> GPT:
    """``model`` (the stage's GPT on the meta device, quantized as its config says) with what fits ``budget``
    bytes read from ``reader`` and the rest streamed from it; ``model.offload`` holds the plan."""
    lora = info.get("lora") or {}
    scale = lora["alpha"] / lora["rank"] if lora else 0.0
    cfg = model.cfg
    p = plan(reader, cfg, budget, slots)
    head_quant = not isinstance(model.lm_head, nn.Linear)
    if not p.base_resident and head_quant:
        raise ValueError(f"--max-memory {mb(budget)}: the quantized LM head does not fit beside the slots; "
                         f"stream a stage quantized without --include-head, or give more memory")
    materialize(model.norm_f, reader, "norm_f.")
    if model.pos_emb is not None:
        materialize(model.pos_emb, reader, "pos_emb.")
    emb_key = "tok_emb.weight"
    head_key = "lm_head.weight" if "lm_head.weight" in reader else emb_key
    if p.base_resident:
        materialize(model.tok_emb, reader, "tok_emb.")
        if cfg.tie_embeddings and not head_quant:
            model.lm_head.weight = model.tok_emb.weight
        else:
            materialize(model.lm_head, reader, "lm_head.")
    else:
        dtype = reader.entries[emb_key][0]
        model.tok_emb = DiskEmbedding(reader, emb_key, cfg.vocab_size, cfg.n_embd, dtype)
        head_dtype = reader.entries[head_key][0]
        chunk = max(1, p.block_bytes // (cfg.n_embd * head_dtype.itemsize))
        model.lm_head = StreamedHead(reader, head_key, cfg.vocab_size, cfg.n_embd, head_dtype, chunk, slots)
    streamer = None
    if p.streamed_blocks:
        proto = model.blocks[p.streamed_blocks[0]]
        # a slot: a copy of a meta block with real (uninitialised) CPU tensors, filled at each load
        bufs = [copy.deepcopy(proto).to_empty(device="cpu").eval() for _ in range(min(slots, len(p.streamed_blocks)))]
        streamer = Prefetcher(p.streamed_blocks, bufs, lambda blk, i: materialize(blk, reader, f"blocks.{i}.", scale),
                              "blocks")
    wrapped = []
    for i, blk in enumerate(model.blocks):
        if i in p.resident_blocks:
            materialize(blk, reader, f"blocks.{i}.", scale)
            wrapped.append(ScheduledBlock(i, blk, None, micro_tokens))
        else:
            wrapped.append(ScheduledBlock(i, None, streamer, micro_tokens))
    model.blocks = nn.ModuleList(wrapped)
    model.offload = p
    # the prefetch threads and the file close with the model (they hold the slots and the reader, never the model)
    threads = [t for t in (streamer, getattr(model.lm_head, "_streamer", None)) if t is not None]
    weakref.finalize(model, _shut, threads, reader)
    return model.eval()


def _shut(threads: list, reader: SafetensorsFile) -> None:
    for t in threads:
        t.close()
    reader.close()
