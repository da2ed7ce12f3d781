"""Streamed (offloaded) layers: run a GPT whose weights do not fit a memory budget.

The model is built on the meta device (no weights at all), then what fits the budget is made resident
-- the final norm, the embedding and LM head first, then as many whole blocks as fit -- and every other
block is *streamed*: just before it runs, its tensors are read from the stage's ``model.safetensors``
into one of a small fixed set of reusable slots (whole ``Block`` modules), by a prefetch thread that
loads block i+1 while block i computes. When even the embedding and head do not fit beside the slots
(SmolLM2's tied 49k-token table is a fifth of the model), the embedding looks up its rows on disk and
the LM head streams through slots of its own, a chunk of the vocabulary at a time.

The file is read with plain positional reads (``os.preadv`` into preallocated buffers, the header
parsed here: 8-byte length + JSON of dtype / shape / data_offsets), never memory-mapped: pages a mapping
touches count in the process's resident set, pages a read copies from do not.

Everything is applied from outside the model (torchtitan-style): the streamed blocks are replaced by
``ScheduledBlock`` wrappers, so ``GPT.forward``, ``Engine`` and the server run unchanged. The wrappers
also carry the *block schedule* of offline batch generation (FlexGen's): a big batch goes through a
loaded layer in micro-batches of at most ``micro_tokens`` tokens, so each layer, once loaded, serves
the whole batch (every micro-batch) before the next is loaded -- at the prefill and at every decode step.
The logits are bitwise those of the resident model (same modules, same bits, fetched later) whenever a
forward fits one micro-batch; split, they are those of the resident model run on each micro-batch.

A quantized stage (quant.py's portable layout) streams too: int8 codes are read straight into the
slot's buffers, int4 codes are read and packed for the CPU kernel at each load (``set_portable``).
Compute is CPU only for now: on a GPU the slots would be pinned CPU buffers copied by a side stream.

    chatfactory generate --run runs/smol --stage sft --prompts p.jsonl --out a.jsonl --max-memory 150MB
    chatfactory chat --run runs/smol --max-memory 300MB           # chat, sample, serve, eval take it too

    from chatfactory.model.offload import load_streamed
    model, info = load_streamed("runs/smol/sft", budget=parse_size("150MB"))   # model.offload: the plan
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import queue
import re
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..store import checkpoint
from ..store import load as _load
from ..store.files import CheckpointError
from .gpt import GPT, GPTConfig

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
SLOTS = 2  # one block computes while the next loads: more slots only buy memory


def parse_size(spec) -> int:
    """"300MB", "1.5GB", "64MiB", "2048" (bytes) -> bytes; anything else a ValueError naming it."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(spec))
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise ValueError(f"--max-memory {spec!r}: give a size such as 300MB, 1.5GB or 64MiB "
                         f"(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"--max-memory {spec!r}: must be more than zero")
    return n


def mb(n: int) -> str:  # noqa: D103
    return f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------- reading the file
class SafetensorsReader:
    """Tensors of one safetensors file read by offset into buffers the caller owns (thread-safe:
    ``os.preadv`` takes its own offset, so the prefetch thread and the embedding share one descriptor)."""

    def __init__(self, path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(os.pread(self.fd, n, 8))
            header.pop("__metadata__", None)
            self.entries = {}
            for name, e in header.items():
                start, end = e["data_offsets"]
                dtype, shape = DTYPES[e["dtype"]], tuple(e["shape"])
                if end - start != math.prod(shape) * dtype.itemsize or not 0 <= start <= end <= size - 8 - n:
                    raise ValueError(f"tensor {name}: offsets {start}..{end} do not match {e['dtype']}{list(shape)}")
                self.entries[name] = (dtype, shape, 8 + n + start)
        except (struct.error, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            os.close(self.fd)
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def nbytes(self, prefix: str = "") -> int:
        return sum(math.prod(s) * d.itemsize for k, (d, s, _) in self.entries.items() if k.startswith(prefix))

    def _entry(self, name: str):
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: no tensor {name!r} (the weights do not fit the model)")
        return self.entries[name]

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        dtype, shape, offset = self._entry(name)
        if out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
            raise CheckpointError(f"{self.path}: {name} is {dtype}{list(shape)}, the model wants "
                                  f"{out.dtype}{list(out.shape)}")
        self._pread(out.view(-1).view(torch.uint8).numpy(), offset, name)
        return out

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, _ = self._entry(name)
        return self.read_into(name, torch.empty(shape, dtype=dtype))

    def read_rows(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``start`` .. ``start + len(out)`` of a 2-D tensor into ``out``: a head chunk, an embedding row."""
        dtype, shape, offset = self._entry(name)
        self._pread(out.view(torch.uint8).numpy(), offset + start * shape[1] * dtype.itemsize, name)
        return out

    def _pread(self, buf, offset: int, name: str) -> None:
        view, done = memoryview(buf).cast("B"), 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: truncated while reading {name}")
            done += n


def _materialize(module: nn.Module, reader: SafetensorsReader, prefix: str, lora_scale: float = 0.0) -> None:
    """Give a meta-device (or slot) module the weights stored under ``prefix`` in place: its tensors
    are read straight into its own storage; int4 QuantLinears get their codes packed for the kernel; a
    LoRA stage's adapters are merged as ``checkpoint.load_model`` merges them (train/lora.py: same ops)."""
    from .lora import delta_weight
    from .quant import QuantLinear

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
            if tname == "weight" and p + "lora_A" in reader.entries:
                delta = delta_weight(reader.read(p + "lora_A"), reader.read(p + "lora_B"), lora_scale)
                t.data.copy_((t.data.float() + delta).to(t.dtype))
        if isinstance(m, QuantLinear):
            m.relayout()  # built on meta it chose the plain layout; also drops the old scales' bf16 copy


# ---------------------------------------------------------------- the prefetch thread
class Prefetcher:
    """Loads units (block numbers, head chunks) into ``len(slots)`` reusable slots, in a fixed cyclic
    ``order``, one thread ahead of the compute: while unit i runs, units i+1 .. i+slots-1 load.

    ``acquire(u)`` waits for u's slot; ``release(u)`` frees it and queues the unit ``slots`` places
    further round the cycle (the next forward pass starts from the first again). A unit asked for out
    of turn (a forward cut short by an error) drains the queue and restarts the cycle from it."""

    def __init__(self, order: list, slots: list, load, name: str):
        self.order, self.slots, self.load = list(order), slots, load
        self.pos = {u: i for i, u in enumerate(self.order)}
        self.ready = [threading.Event() for _ in slots]
        self.slot_of: dict = {}
        self.error: BaseException | None = None
        self.jobs: queue.Queue = queue.Queue()
        self.loads = 0  # units loaded so far (a test reads it: the schedule loads each layer once a pass)
        self.waited = 0.0  # seconds the compute spent waiting for a load: what the prefetch did not hide
        self.thread = threading.Thread(target=self._work, name=f"prefetch-{name}", daemon=True)
        self.thread.start()
        self._restart(self.order[0])

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            s, u = job
            try:
                if self.error is None:
                    self.load(self.slots[s], u)
                    self.loads += 1
            except BaseException as e:  # handed to the compute thread at its next acquire
                self.error = e
            finally:
                self.ready[s].set()
                self.jobs.task_done()

    def _queue(self, s: int, u) -> None:
        self.ready[s].clear()
        self.slot_of[u] = s
        self.jobs.put((s, u))

    def _restart(self, u) -> None:
        self.jobs.join()
        self.slot_of.clear()
        i = self.pos[u]
        for s in range(min(len(self.slots), len(self.order))):
            self._queue(s, self.order[(i + s) % len(self.order)])

    def acquire(self, u):
        if u not in self.slot_of:
            self._restart(u)
        s = self.slot_of[u]
        if not self.ready[s].is_set():
            t = time.perf_counter()
            self.ready[s].wait()
            self.waited += time.perf_counter() - t
        if self.error is not None:
            e, self.error = self.error, None
            self._restart(u)  # the next call tries again from a clean cycle
            raise e
        return self.slots[s]

    def release(self, u) -> None:
        if len(self.order) <= len(self.slots):
            return  # every unit has a slot of its own: load once, keep
        s = self.slot_of.pop(u)
        self._queue(s, self.order[(self.pos[u] + len(self.slots)) % len(self.order)])

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)


# ---------------------------------------------------------------- the wrappers
def _rows(t, rows: slice, B: int):
    """A batch-wide argument's micro-batch: per-row tensors (3-D and up, leading B) are sliced."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(_rows(x, rows, B) for x in t)
    return t[rows] if t.dim() >= 3 and t.size(0) == B else t


def run_block(block: nn.Module, x, rope, cache, attn_mask, micro_tokens: int | None):
    """The block schedule: ``x`` (B, T, d) through one loaded block in micro-batches of at most
    ``micro_tokens`` tokens (whole rows), so the layer serves every row before the next one loads."""
    B, T = x.shape[:2]
    rows = B if not micro_tokens else max(1, micro_tokens // T)
    if rows >= B or (cache is not None and not cache.viewable):  # the server's slot-wise steps: whole batch
        return block(x, rope, cache, attn_mask)
    out = torch.empty_like(x)
    for a in range(0, B, rows):
        sl = slice(a, a + rows)
        out[sl] = block(x[sl], _rows(rope, sl, B), None if cache is None else cache.view(sl),
                        _rows(attn_mask, sl, B))
    return out


class ScheduledBlock(nn.Module):
    """Stands in for ``model.blocks[layer]``: a resident block (``block``) or one the prefetcher streams."""

    def __init__(self, layer: int, block: nn.Module | None, streamer: Prefetcher | None, micro_tokens):
        super().__init__()
        self.layer, self.block, self.micro_tokens = layer, block, micro_tokens
        self._streamer = streamer  # not a submodule: the slots' tensors are not the model's parameters

    def forward(self, x, rope=None, cache=None, attn_mask=None):
        if self.block is not None:
            return run_block(self.block, x, rope, cache, attn_mask, self.micro_tokens)
        block = self._streamer.acquire(self.layer)
        try:
            block.attn.layer = self.layer  # the slot writes this layer's keys/values
            return run_block(block, x, rope, cache, attn_mask, self.micro_tokens)
        finally:
            self._streamer.release(self.layer)


class DiskEmbedding(nn.Module):
    """The token embedding looked up on disk: only the rows a batch uses are read (a copy: exact)."""

    def __init__(self, reader: SafetensorsReader, key: str, num: int, dim: int, dtype):
        super().__init__()
        self.reader, self.key, self.num, self.dim, self.dtype = reader, key, num, dim, dtype
        self.weight = torch.empty(0, dtype=dtype)  # device and dtype only (KVCache.for_model reads them)

    def forward(self, idx):
        flat = idx.reshape(-1)
        ids, inverse = torch.unique(flat, return_inverse=True)
        if ids.numel() and (ids[0] < 0 or ids[-1] >= self.num):
            raise IndexError(f"token id out of range [0, {self.num})")
        rows = torch.empty(ids.numel(), self.dim, dtype=self.dtype)
        for i, r in enumerate(ids.tolist()):
            self.reader.read_rows(self.key, r, rows[i: i + 1])
        return rows[inverse].reshape(*idx.shape, self.dim)


class StreamedHead(nn.Module):
    """The LM head streamed a chunk of the vocabulary at a time through slots of its own; the logits
    are the chunks' products side by side (each logit is the same dot product as in one matmul)."""

    def __init__(self, reader: SafetensorsReader, key: str, vocab: int, dim: int, dtype, chunk: int, slots: int):
        super().__init__()
        self.vocab, self.chunk, self.key, self.reader = vocab, chunk, key, reader
        bufs = [torch.empty(chunk, dim, dtype=dtype) for _ in range(slots)]
        self._streamer = Prefetcher(list(range(0, vocab, chunk)), bufs, self._load, "head")

    def _load(self, buf, start: int) -> None:
        self.reader.read_rows(self.key, start, buf[: min(self.chunk, self.vocab - start)])

    def forward(self, h):
        out = torch.empty(*h.shape[:-1], self.vocab, dtype=h.dtype)
        for start in self._streamer.order:
            w = self._streamer.acquire(start)
            try:
                n = min(self.chunk, self.vocab - start)
                out[..., start: start + n] = F.linear(h, w[:n])
            finally:
                self._streamer.release(start)
        return out


# ---------------------------------------------------------------- the plan
@dataclass
class Plan:
    budget: int
    resident_blocks: list
    streamed_blocks: list
    base_resident: bool  # the embedding and head resident (else looked up / streamed from disk)
    block_bytes: int
    resident_bytes: int  # resident weights + every slot: what the budget pays for
    model_bytes: int

    def describe(self) -> str:
        base = "embedding/head resident" if self.base_resident else "embedding read by row, head streamed"
        return (f"{len(self.resident_blocks)} blocks resident, {len(self.streamed_blocks)} streamed "
                f"({base}; {mb(self.resident_bytes)} of the {mb(self.budget)} budget, model {mb(self.model_bytes)})")


def plan(reader: SafetensorsReader, cfg: GPTConfig, budget: int, slots: int = SLOTS) -> Plan:
    sizes = [reader.nbytes(f"blocks.{i}.") for i in range(cfg.depth)]
    block_bytes, model_bytes = max(sizes), reader.nbytes()
    base = model_bytes - sum(sizes)  # embeddings, head, final norm
    norms = reader.nbytes("norm_f.")
    head_slots = slots * block_bytes  # head chunks as big as a block
    if base + slots * block_bytes <= budget:
        fixed, base_resident = base, True
    else:
        fixed, base_resident = norms + head_slots + (reader.nbytes("pos_emb.")), False
    if fixed + min(slots, cfg.depth) * block_bytes > budget:
        raise ValueError(f"--max-memory {mb(budget)} is too small for this model: the smallest that streams it is "
                         f"{mb(fixed + slots * block_bytes)} ({slots} slots of {mb(block_bytes)} for the blocks"
                         f"{'' if base_resident else ', and as many for the LM head'})")
    n_res = min(cfg.depth, (budget - fixed - slots * block_bytes) // block_bytes)
    if n_res >= cfg.depth - slots:  # the slots would hold the rest anyway: keep them all
        n_res = cfg.depth if fixed + cfg.depth * block_bytes <= budget else n_res
    streamed = list(range(n_res, cfg.depth))
    used = fixed + n_res * block_bytes + (min(slots, len(streamed)) * block_bytes if streamed else 0)
    return Plan(budget, list(range(n_res)), streamed, base_resident, block_bytes, used, model_bytes)


def load_streamed(stage_dir, budget: int, device="cpu", micro_tokens: int | None = 4096,
                  slots: int = SLOTS) -> tuple[GPT, dict]:
    """-> (the stage's GPT with what does not fit ``budget`` bytes streamed from disk, its config.json).
    ``model.offload`` holds the plan. A quantized stage streams its integer codes as they are stored."""
    from ..store.load import stage_model

    stage_dir = Path(stage_dir)
    if str(device) != "cpu":
        raise ValueError(f"--max-memory streams layers on the CPU only for now (asked for device {device})")
    info = checkpoint.stage_config(stage_dir)
    lora = info.get("lora") or {}
    scale = lora["alpha"] / lora["rank"] if lora else 0.0
    _load.refuse_quantized(info, stage_dir)
    if not info.get("quantized") and _load.quantize_on_load is not None:
        raise ValueError("--quantize with --max-memory: quantize the stage once (chatfactory quantize --run … "
                         "--stage …) and stream the quantized stage, rather than requantizing every streamed layer")
    model = stage_model(info, stage_dir)
    cfg = model.cfg
    reader = SafetensorsReader(stage_dir / checkpoint.MODEL)
    p = plan(reader, cfg, budget, slots)
    head_quant = not isinstance(model.lm_head, nn.Linear)
    if not p.base_resident and head_quant:
        raise ValueError(f"--max-memory {mb(budget)}: the quantized LM head does not fit beside the slots; "
                         f"stream a stage quantized without --include-head, or give more memory")
    _materialize(model.norm_f, reader, "norm_f.")
    if model.pos_emb is not None:
        _materialize(model.pos_emb, reader, "pos_emb.")
    emb_key = "tok_emb.weight"
    head_key = "lm_head.weight" if "lm_head.weight" in reader.entries else emb_key
    if p.base_resident:
        _materialize(model.tok_emb, reader, "tok_emb.")
        if cfg.tie_embeddings and not head_quant:
            model.lm_head.weight = model.tok_emb.weight
        else:
            _materialize(model.lm_head, reader, "lm_head.")
    else:
        dtype = reader.entries[emb_key][0]
        model.tok_emb = DiskEmbedding(reader, emb_key, cfg.vocab_size, cfg.n_embd, dtype)
        chunk = max(1, p.block_bytes // (cfg.n_embd * reader.entries[head_key][0].itemsize))
        model.lm_head = StreamedHead(reader, head_key, cfg.vocab_size, cfg.n_embd, reader.entries[head_key][0],
                                     chunk, slots)
    streamer = None
    if p.streamed_blocks:
        proto = model.blocks[p.streamed_blocks[0]]
        # a slot: a copy of a meta block with real (uninitialised) CPU tensors, filled at each load
        bufs = [copy.deepcopy(proto).to_empty(device="cpu").eval() for _ in range(min(slots, len(p.streamed_blocks)))]
        streamer = Prefetcher(p.streamed_blocks, bufs, lambda blk, i: _materialize(blk, reader, f"blocks.{i}.", scale),
                               "blocks")
    wrapped = []
    for i, blk in enumerate(model.blocks):
        if i in p.resident_blocks:
            _materialize(blk, reader, f"blocks.{i}.", scale)
            wrapped.append(ScheduledBlock(i, blk, None, micro_tokens))
        else:
            wrapped.append(ScheduledBlock(i, None, streamer, micro_tokens))
    model.blocks = nn.ModuleList(wrapped)
    model.offload = p
    # the prefetch threads and the file close with the model (they hold the slots, never the model)
    threads = [t for t in (streamer, getattr(model.lm_head, "_streamer", None)) if t is not None]
    weakref.finalize(model, _shut, threads, reader)
    return model.eval(), info


def stall_seconds(model) -> float:
    """Seconds the compute of a streamed model has waited for its layers' loads so far."""
    units = [getattr(m, "_streamer", None) for m in model.modules()]
    return sum(p.waited for p in {id(p): p for p in units if p is not None}.values())


def _shut(threads: list, reader: SafetensorsReader) -> None:
    for t in threads:
        t.close()
    reader.close()


def memory_mode(model) -> dict:
    """What /v1/models reports: {"memory": "resident"}; with a budget {"memory": "streamed" (or "resident" when
    everything fit), "memory_budget_mb": B}."""
    p = getattr(model, "offload", None)
    if p is None:
        return {"memory": "resident"}
    streams = bool(p.streamed_blocks) or not p.base_resident
    return {"memory": "streamed" if streams else "resident", "memory_budget_mb": round(p.budget / 1e6, 1)}


@contextlib.contextmanager
def streaming(max_memory: str | None):
    """For inference commands: within it ``checkpoint.load_model`` streams what does not fit
    ``max_memory`` ("300MB"); with None it changes nothing."""
    if not max_memory:
        yield
        return
    budget = parse_size(max_memory)
    old = _load.stream_loader
    _load.stream_loader = lambda stage_dir, device: load_streamed(stage_dir, budget, device)
    try:
        yield
    finally:
        _load.stream_loader = old
