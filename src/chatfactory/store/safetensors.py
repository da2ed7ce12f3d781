"""The one reader of safetensors files: every load of a stage (whole, lazy, quantized, quantized on load,
streamed) reads its ``model.safetensors`` through ``SafetensorsFile``.

The file is opened once and read with positional reads (``os.preadv``) into tensors the reader (or the
caller) allocates, never memory-mapped: pages a mapping touches count in the process's resident set, pages
a read copies from do not. Every read goes through the one descriptor opened first, so a save that renames
a new file over this one meanwhile cannot mix two saves: what is read is the file that was opened (and that
``checkpoint.load_checkpoint`` checked against config.json). The header (8-byte length + JSON of dtype /
shape / data_offsets) is checked as strictly as the safetensors library checks it, so a truncated or
corrupt file is a CheckpointError naming it at open, before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
import weakref
from pathlib import Path

import torch

from .files import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


class SafetensorsFile:
    """Tensors of one safetensors file, read by offset (thread-safe: ``os.preadv`` takes its own offset, so
    a prefetch thread and the caller share the descriptor). ``entries``: {name: (dtype, shape, offset)};
    ``metadata``: the header's ``__metadata__`` (a checkpoint's step and save_id)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open the checkpoint ({e.strerror})") from None
        self._close = weakref.finalize(self, os.close, fd)  # closed with the last reference, or by close()
        self.fd = fd
        try:
            self.metadata, self.entries = self._header(os.fstat(fd).st_size)
        except (struct.error, ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            self.close()  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
            raise CheckpointError(f"{self.path}: corrupt or truncated checkpoint "
                                  f"(bad safetensors header: {e})") from None

    def _header(self, size: int) -> tuple[dict, dict]:
        """Parse and check the header: every tensor's bytes lie side by side, in order, and fill the file."""
        (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        if not 0 < n <= min(size - 8, MAX_HEADER):
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        header = json.loads(os.pread(self.fd, n, 8).decode("utf-8"))
        metadata = header.pop("__metadata__", None) or {}
        entries, end = {}, 0
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
            start, stop = e["data_offsets"]
            dtype, shape = DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"])
            if start != end or stop - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name}: offsets {start}..{stop} do not follow on at {end} "
                                 f"as {e['dtype']}{list(shape)}")
            entries[name], end = (dtype, shape, 8 + n + start), stop
        if 8 + n + end != size:
            raise ValueError(f"the tensors take {end} bytes, the file holds {size - 8 - n} after its header")
        return metadata, entries

    def close(self) -> None:
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def nbytes(self, prefix: str = "") -> int:
        """Bytes of the tensors whose names start with ``prefix`` (all of them by default)."""
        return sum(math.prod(s) * d.itemsize for k, (d, s, _) in self.entries.items() if k.startswith(prefix))

    def _entry(self, name: str):
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: no tensor {name!r} (the weights do not fit the model)")
        return self.entries[name]

    def read(self, name: str) -> torch.Tensor:
        """A new tensor holding ``name``."""
        dtype, shape, _ = self._entry(name)
        return self.read_into(name, torch.empty(shape, dtype=dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """``name`` into the caller's contiguous tensor of its dtype and shape."""
        dtype, shape, offset = self._entry(name)
        if out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
            raise CheckpointError(f"{self.path}: {name} is {dtype}{list(shape)}, the model wants "
                                  f"{out.dtype}{list(out.shape)}")
        self._pread(out, offset, name)
        return out

    def read_rows(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``start`` .. ``start + len(out)`` of a 2-D tensor into ``out``: a head chunk, an embedding row."""
        dtype, shape, offset = self._entry(name)
        if out.dtype != dtype or out.shape[1:] != shape[1:] or not 0 <= start <= start + len(out) <= shape[0]:
            raise CheckpointError(f"{self.path}: rows {start}..{start + len(out)} of {name} "
                                  f"{dtype}{list(shape)} do not fit {out.dtype}{list(out.shape)}")
        self._pread(out, offset + start * math.prod(shape[1:]) * dtype.itemsize, name)
        return out

    def _pread(self, out: torch.Tensor, offset: int, name: str) -> None:
        if not out.numel():
            return
        view, done = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B"), 0
        while done < len(view):
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as e:
                raise CheckpointError(f"{self.path}: could not read {name} ({e.strerror})") from None
            if n <= 0:
                raise CheckpointError(f"{self.path}: corrupt or truncated checkpoint (the file ends inside {name})")
            done += n
