"""Token shards: text tokenized once into memory-mapped files, and the pretraining batch loader.

``build_shards`` writes ``runs/NAME/data/train_000.bin …`` and ``val.bin`` (raw uint16/uint32 ids,
each document opened by ``<|bos|>``) plus ``meta.json``, written last, which marks the set complete
and records what made it (tokenizer and data config); a later run with the same inputs reuses them.
The tail ``val_fraction`` of each shard's token stream is held out for validation.

``PretrainBatches`` is stateless: the sequences of optimizer step ``s`` are a pure function of
(seed, s), so resuming at step s is exact, and under DDP each rank takes its own slice of the same
global batch — N processes see exactly the samples one process would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..store.files import atomic_write_text

# documents per call of the tokenizer's multi-threaded encode_batch: enough to keep its threads busy,
# few enough that a batch of long documents stays small in memory
DOCS_PER_BATCH = 256


def _key(tokenizer_json: str, data_cfg: dict) -> str:
    return hashlib.sha256((tokenizer_json + json.dumps(data_cfg, sort_keys=True)).encode()).hexdigest()[:16]


def build_shards(texts: Iterable[str], tok, out_dir, data_cfg, progress: bool = True) -> dict:
    """Tokenize ``texts`` into ``out_dir`` unless an identical set is already there. Returns meta."""
    out_dir = Path(out_dir)
    from dataclasses import asdict

    key = _key(tok.hf.to_str(), asdict(data_cfg))
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return meta
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    train_files, val_parts, buf, n_buf = [], [], [], 0

    def flush():
        nonlocal buf, n_buf
        if not n_buf:
            return
        arr = np.concatenate(buf).astype(dtype)
        n_val = int(round(len(arr) * data_cfg.val_fraction))
        name = f"train_{len(train_files):03d}.bin"
        arr[: len(arr) - n_val].tofile(out_dir / name)
        train_files.append({"file": name, "tokens": len(arr) - n_val})
        val_parts.append(arr[len(arr) - n_val :])
        buf, n_buf = [], 0

    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress)
    batch: list[str] = []
    n_docs = 0

    def encode(batch):
        nonlocal n_buf
        for ids in tok.encode_batch(batch):
            buf.append(np.asarray([tok.bos_id] + ids, dtype=np.int64))
            n_buf += len(ids) + 1
            bar.update(len(ids) + 1)
            if n_buf >= data_cfg.shard_tokens:
                flush()

    for text in texts:
        batch.append(text)
        n_docs += 1
        if len(batch) == DOCS_PER_BATCH:
            encode(batch)
            batch = []
    encode(batch)
    flush()
    bar.close()
    val = np.concatenate(val_parts) if val_parts else np.zeros(0, dtype)
    val.astype(dtype).tofile(out_dir / "val.bin")
    meta = {"key": key, "dtype": np.dtype(dtype).name, "docs": n_docs, "train": train_files,
            "val": {"file": "val.bin", "tokens": int(len(val))}, "vocab_size": tok.vocab_size}
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    return meta


class TokenStream:
    """Several memory-mapped shard files seen as one array of token ids."""

    def __init__(self, files: list[Path], dtype: str):
        self.arrays = [np.memmap(f, dtype=dtype, mode="r") for f in files if Path(f).stat().st_size > 0]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, end: int) -> np.ndarray:
        out, pos = [], start
        while pos < end:
            i = int(np.searchsorted(self.starts, pos, side="right") - 1)
            local = pos - self.starts[i]
            take = min(end - pos, len(self.arrays[i]) - local)
            out.append(self.arrays[i][local : local + take])
            pos += take
        return np.concatenate(out).astype(np.int64)


def open_split(data_dir, split: str) -> TokenStream:
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    files = [data_dir / f["file"] for f in meta["train"]] if split == "train" else [data_dir / meta["val"]["file"]]
    return TokenStream(files, meta["dtype"])


class PretrainBatches:
    """Windows of ``seq_len + 1`` tokens. Each epoch shifts the window grid by a random offset and
    visits the windows in a random order, both drawn from (seed, epoch)."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int):
        self.stream, self.T, self.seed = stream, seq_len, seed
        if len(stream) < seq_len + 2:
            raise ValueError(f"only {len(stream)} training tokens: too few for sequences of {seq_len} "
                             "(lower pretrain.seq_len)")
        self._epoch = None

    def _plan(self, epoch: int):
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            shift = int(torch.randint(0, self.T, (1,), generator=g))
            n = (len(self.stream) - 1 - shift) // self.T
            self._epoch, self._shift, self._perm = epoch, shift, torch.randperm(n, generator=g)
        return self._shift, self._perm

    def window(self, k: int) -> np.ndarray:
        """The k-th sample of the endless shuffled stream of windows."""
        _, perm0 = self._plan(0)
        per_epoch = len(perm0)  # epochs differ by at most one window; use epoch 0's count as the period
        epoch, j = divmod(k, per_epoch)
        shift, perm = self._plan(epoch)
        start = shift + int(perm[j % len(perm)]) * self.T
        return self.stream.read(start, start + self.T + 1)

    def micro_batch(self, step: int, micro: int, grad_accum: int, batch_size: int, rank: int = 0, world: int = 1):
        """(x, y) for one process's ``micro``-th micro-batch of optimizer step ``step``."""
        per_step = batch_size * world * grad_accum
        first = step * per_step + micro * batch_size * world + rank * batch_size
        rows = np.stack([self.window(first + b) for b in range(batch_size)])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def val_batches(stream: TokenStream, seq_len: int, batch_size: int, n_windows: int, rank: int = 0, world: int = 1):
    """The first ``n_windows`` validation windows (a fixed set, whatever the world size), this rank's
    share, as (x, y) batches."""
    n = min((len(stream) - 1) // seq_len, n_windows)
    mine = list(range(rank, n, world))
    for i in range(0, len(mine), batch_size):
        rows = np.stack([stream.read(j * seq_len, j * seq_len + seq_len + 1) for j in mine[i : i + batch_size]])
        t = torch.from_numpy(rows)
        yield t[:, :-1].contiguous(), t[:, 1:].contiguous()
