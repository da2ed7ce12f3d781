"""Files written so that a crash or a full disk never leaves a half-written one: write a temp, flush it
to disk, rename it over the old file. Every stage directory, tokenizer, config, report and answers file
is written through here.

A write that fails (a full disk above all) removes its partial temp, leaves the old file as it was and
raises ``DiskFullError`` / ``CheckpointError`` naming the file; the CLI prints the message, no traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent; the message names it."""


class DiskFullError(CheckpointError):
    """The disk filled up while a file was written. The message names the file; the partial temp is
    gone and the file it was to replace (the previous checkpoint) is as it was."""


class WriteFailed(CheckpointError):
    """Writing ``tmp`` (to become ``path``) failed with ``cause``; the partial ``tmp`` is removed."""

    def __init__(self, path: Path, tmp: Path, what: str, cause: BaseException, tail: str):
        self.path, self.tmp, self.what, self.cause, self.full = path, tmp, what, cause, disk_full(cause)
        super().__init__(f"{path}: {self.reason()} while writing {what} (the partial {tmp.name} was removed); {tail}")

    def reason(self) -> str:
        if self.full:
            return "disk full (no space left on device)"
        return f"could not write ({type(self.cause).__name__}: {first_line(self.cause)})"


class _DiskFull(WriteFailed, DiskFullError):
    pass


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the device or the quota is full (an OSError, or a library's error that wraps
    one in its message: safetensors reports ``No space left on device (os error 28)``)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(m in text for m in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "StorageFull",
                                   f"os error {errno.ENOSPC}"))


def _write_error(path: Path, tmp: Path, e: BaseException, what: str) -> CheckpointError:
    """The error to raise when writing ``tmp`` (to become ``path``) failed with ``e``."""
    tail = (f"{path.name} is as it was" + ("; free some space and run the same command again" if disk_full(e) else ""))
    return (_DiskFull if disk_full(e) else WriteFailed)(path, tmp, what, e, tail)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def fsync_dir(d: Path) -> None:
    """Make renames in ``d`` durable (a power cut after a save keeps it); a no-op where unsupported."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RecordingWriter:
    """A file object for ``torch.save`` that keeps the OSError of a failed write: torch reports a full
    disk as ``unexpected pos 704 vs 598`` and drops the reason."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_file(path: Path, tmp: Path, write, what: str) -> None:
    """``write(tmp)``, then flush it to disk. On any failure the partial ``tmp`` is removed and a
    CheckpointError (a DiskFullError for a full disk) naming ``path`` is raised; ``path`` is not touched."""
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException as e:
        remove_quietly(tmp)
        if isinstance(e, Exception) and not isinstance(e, CheckpointError):
            raise _write_error(path, tmp, e, what) from None
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``path`` through ``path.tmp`` + fsync + rename: a reader sees the old text or the new one,
    and a failed write (a full disk: DiskFullError naming ``path``) leaves the old one in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_file(path, tmp, lambda t: t.write_text(text, encoding="utf-8"), "it")
    os.replace(tmp, path)


def append_text(path, text: str) -> None:
    """Append ``text`` to a log (``metrics.jsonl``). A full disk raises DiskFullError naming the file; a
    line cut short is dropped when it is read back (``read_appended``)."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        if disk_full(e):
            raise DiskFullError(f"{path}: disk full (no space left on device) while appending to it; "
                                f"free some space and run the same command again") from None
        raise



def read_appended(path) -> list[tuple[str, dict]]:
    """(line, row) for each whole JSON line of a log ``append_text`` wrote; a line a kill cut short is
    skipped; no file, no rows."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:  # the torn last line of a process killed while it appended
            continue
    return out
