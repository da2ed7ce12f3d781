"""Reading data files: gzip-transparent text, JSONL rows, and the error that names file and line.

Below ``data/`` and ``inference/``: every reader (text sources, chat, comparisons, prompts, the prompts
of ``generate``) opens its files through here, so a bad row reads the same everywhere —
``DataError("path:line: what is wrong")``.

    for n, row in read_jsonl("data/prefs.jsonl.gz"):
        ...
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path


class DataError(ValueError):
    """A data file is unreadable or a row is malformed; the message names the file and line."""


def open_text(path: Path):
    """Open a text file, transparently un-gzipping ``*.gz``."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line raises DataError naming it."""
    path = Path(path)
    try:
        with open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                yield n, row
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
