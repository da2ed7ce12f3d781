"""Streamed (offloaded) layers: the runtime that runs a GPT whose weights do not fit a memory budget.

``plan`` splits the model: the final norm, the embedding and LM head first, then as many whole blocks as
fit stay resident; every other block is *streamed*: just before it runs, its tensors are loaded into one
of a small fixed set of reusable slots (whole ``Block`` modules) by a ``Prefetcher`` thread that loads
block i+1 while block i computes. When even the embedding and head do not fit beside the slots (a tied
table of a large vocabulary), ``DiskEmbedding`` looks up its rows on disk and ``StreamedHead`` streams the
LM head a chunk of the vocabulary at a time.

The runtime never opens a file: it is handed a reader (duck-typed: ``nbytes(prefix)`` and
``read_rows(name, start, out)``) and a load function for the slots. store/streamed.py builds a stage's
model this way from the stage's checked ``SafetensorsFile`` (``load_model(..., max_memory=)``).

Everything is applied from outside the model (torchtitan-style): the streamed blocks are replaced by
``ScheduledBlock`` wrappers, so ``GPT.forward``, ``Engine`` and the server run unchanged. The wrappers
also carry the *block schedule* of offline batch generation (FlexGen's): a big batch goes through a
loaded layer in micro-batches of at most ``micro_tokens`` tokens, so each layer, once loaded, serves
the whole batch (every micro-batch) before the next is loaded -- at the prefill and at every decode step.
A block computes what the resident one computes on the same rows (the same module, the same bits,
fetched later); the head streamed in chunks computes each logit as a dot product of the same length, in
an order the BLAS picks per shape (tests/test_offload.py states the tolerance).

A quantized stage streams too: int8 codes are read straight into the slot's buffers, int4 codes are read
and packed for the CPU kernel at each load. Compute is CPU only for now: on a GPU the slots would be
pinned CPU buffers copied by a side stream.

    chatfactory generate --run runs/smol --stage sft --prompts p.jsonl --out a.jsonl --max-memory 150MB
    chatfactory chat --run runs/smol --max-memory 300MB           # chat, sample, serve, eval take it too

    from chatfactory.store.load import load_model
    model, info = load_model("runs/smol/sft", inference=True, max_memory="150MB")   # model.offload: the plan
"""

from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gpt import GPTConfig

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
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

    def __init__(self, reader, key: str, num: int, dim: int, dtype):
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
    are the chunks' products side by side. Each logit is the dot product of the same two vectors as in
    one matmul, but the BLAS may sum it in another order for a chunk's shape: equal to round-off, not bitwise."""

    def __init__(self, reader, key: str, vocab: int, dim: int, dtype, chunk: int, slots: int):
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


def plan(reader, cfg: GPTConfig, budget: int, slots: int = SLOTS) -> Plan:
    """What stays resident within ``budget`` bytes (weights and slots), from the sizes ``reader.nbytes``
    gives: the embedding and head if they fit beside the slots, then the first blocks that fit."""
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


def stall_seconds(model) -> float:
    """Seconds the compute of a streamed model has waited for its layers' loads so far."""
    units = [getattr(m, "_streamer", None) for m in model.modules()]
    return sum(p.waited for p in {id(p): p for p in units if p is not None}.values())


def memory_mode(model) -> dict:
    """What /v1/models reports: {"memory": "resident"}; with a budget {"memory": "streamed" (or "resident" when
    everything fit), "memory_budget_mb": B}."""
    p = getattr(model, "offload", None)
    if p is None:
        return {"memory": "resident"}
    streams = bool(p.streamed_blocks) or not p.base_resident
    return {"memory": "streamed" if streams else "resident", "memory_budget_mb": round(p.budget / 1e6, 1)}
