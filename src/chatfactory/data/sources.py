"""Text sources for pretraining: local files, Hugging Face datasets, or the embedded default.

A source spec (``data.source``) is one of:
  ``embedded``                    the built-in text (see ``embedded.py``), no file needed
  ``embedded+tasks``              the same, with the task generators' text mixed in (``tasks.py``)
  ``path/to/file.txt``            the whole file is one document
  ``path/to/file.jsonl[.gz]``     one JSON object per line; ``data.text_key`` holds the text
  ``path/to/file.parquet``        a column named ``data.text_key`` (needs ``pyarrow``)
  ``path/to/folder``              every such file inside, in sorted order
  ``hf:NAME[:SUBSET]``            a Hugging Face dataset (needs ``datasets`` and a network)
  ``assistant:CHAT``              the assistant turns of chat data (any file/folder/hf spec that SFT
                                  reads, data/chat.py), one document per conversation, less the
                                  held-out slice of ``data.chat_holdout``
  ``heldout:CHAT``                only that held-out slice's assistant turns (listed last, it is the
                                  validation tail: text no stage trains on)
Several specs may be joined with commas. A bad row is an error naming the file and line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..config import DataConfig
from ..formats.jsonl import DataError, open_text, read_jsonl
from .chat import assistant_texts, check_holdout

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")


def _file_texts(path: Path, key: str) -> Iterator[str]:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".jsonl"):
        for n, row in read_jsonl(path):
            text = row.get(key)
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: no string field {key!r} (keys: {', '.join(row)})")
            yield text
    elif name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'chatfactory[parquet]')") from None
        table = pq.read_table(path, columns=[key])
        for batch in table.to_batches():
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        try:
            with open_text(path) as f:
                yield f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _hf_texts(spec: str, key: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: Hugging Face datasets need `pip install 'chatfactory[hf]'`") from None
    name, _, subset = spec[3:].partition(":")
    ds = datasets.load_dataset(name, subset or None, split=split, streaming=True)
    for row in ds:
        text = row.get(key)
        if not isinstance(text, str):
            raise DataError(f"{spec}: row has no string column {key!r} (columns: {', '.join(row)})")
        yield text


def _chat_source(spec: str, cfg: DataConfig) -> Iterator[str]:
    kind, _, chat_spec = spec.partition(":")
    where = f"data.source {spec!r}"
    if not chat_spec.strip():
        raise DataError(f"{where}: name the chat data after '{kind}:' (a file, folder or hf:NAME)")
    if kind == "heldout" and cfg.chat_holdout == 0:
        raise DataError(f"{where}: the held-out slice is empty; set data.chat_holdout > 0 (e.g. 0.05)")
    try:
        check_holdout(cfg.chat_holdout, "data.chat_holdout")
        yield from assistant_texts(chat_spec.strip(), cfg.hf_split, cfg.chat_holdout, heldout=kind == "heldout")
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _one_source(spec: str, cfg: DataConfig) -> Iterator[str]:
    if spec.startswith(("assistant:", "heldout:")):
        yield from _chat_source(spec, cfg)
    elif spec == "embedded":
        from .embedded import embedded_texts

        yield from embedded_texts()
    elif spec == "embedded+tasks":
        from .embedded import embedded_texts
        from .tasks import interleave, pretrain_texts

        # task text spread evenly through the documents, so the validation tail holds both kinds
        yield from interleave(list(embedded_texts()), pretrain_texts())
    elif spec.startswith("hf:"):
        yield from _hf_texts(spec, cfg.text_key, cfg.hf_split)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.name.removesuffix(".gz").endswith(TEXT_SUFFIXES))
            if not files:
                raise DataError(f"{path}: folder holds no .txt/.jsonl/.parquet files")
            for p in files:
                yield from _file_texts(p, cfg.text_key)
        elif path.is_file():
            yield from _file_texts(path, cfg.text_key)
        else:
            raise DataError(f"{spec}: no such file or folder (data.source)")


def iter_texts(cfg: DataConfig) -> Iterator[str]:
    """Every document of the configured source(s), stopping after ``max_chars`` if set."""
    budget = cfg.max_chars or float("inf")
    for spec in [s.strip() for s in cfg.source.split(",") if s.strip()]:
        for text in _one_source(spec, cfg):
            if budget <= 0:
                return
            if len(text) > budget:
                text = text[: int(budget)]
            budget -= len(text)
            yield text
