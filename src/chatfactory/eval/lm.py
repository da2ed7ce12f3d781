"""Language-model quality of a checkpoint on a text file: loss (nats per token) and bits per byte.

Bits per byte divides the total negative log-likelihood (in bits) by the UTF-8 bytes the scored
tokens stand for, so models with different tokenizers compare fairly (a bigger vocabulary makes each
token harder to predict but covers more bytes).

Each document is opened with ``<|bos|>`` (as pretraining does) and the token stream is cut into
non-overlapping windows of ``seq_len`` + 1 tokens; every token but the first of a window is scored.

    from chatfactory.eval.lm import text_loss
    text_loss(model, tok, "val.txt")       # {"loss": …, "bpb": …, "tokens": …, "bytes": …}

CLI: ``chatfactory eval --run runs/NAME --text val.txt``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..data.sources import iter_texts


@torch.no_grad()
def stream_loss(model, tok, ids: list[int], seq_len: int = 0, batch_size: int = 8, max_tokens: int = 0) -> dict:
    """Loss and bits/byte of a token stream (see the module docstring)."""
    seq_len = min(seq_len or model.cfg.block_size, model.cfg.block_size)
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("need at least two tokens to measure a loss")
    device = next(model.parameters()).device
    windows = [ids[i:i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    token_bytes = torch.tensor([len(b) for b in tok.token_bytes] + [0] * max(0, model.cfg.vocab_size - tok.vocab_size),
                               dtype=torch.float64)
    nll = n_tok = n_bytes = 0.0
    was_training = model.training
    model.eval()
    full = [w for w in windows if len(w) == seq_len + 1]
    batches = [full[b:b + batch_size] for b in range(0, len(full), batch_size)]
    batches += [[w] for w in windows if len(w) != seq_len + 1]  # the short tail window on its own
    for batch in batches:
        w = torch.tensor(batch)
        logits = model(w[:, :-1].to(device)).float().cpu()
        y = w[:, 1:]
        nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        n_tok += y.numel()
        n_bytes += token_bytes[y].sum().item()
    model.train(was_training)
    return {"loss": nll / n_tok, "bpb": nll / math.log(2) / max(n_bytes, 1.0), "tokens": int(n_tok),
            "bytes": int(n_bytes)}


def text_loss(model, tok, path, text_key: str = "text", seq_len: int = 0, batch_size: int = 8,
              max_tokens: int = 0) -> dict:
    """Loss and bits/byte on a text source (a .txt/.jsonl(.gz)/.parquet file or folder, as ``data.source``)."""
    ids = document_ids(tok, iter_texts(DataConfig(source=str(path), text_key=text_key)), max_tokens)
    return stream_loss(model, tok, ids, seq_len, batch_size, max_tokens)


def document_ids(tok, texts, max_tokens: int = 0) -> list[int]:
    """The token stream of ``texts``, each opened as a document; read only until past ``max_tokens`` (0: all)."""
    ids: list[int] = []
    for text in texts:
        ids += tok.document(text)
        if max_tokens and len(ids) > max_tokens:
            break
    return ids


def split_texts(path, split: str = "") -> list[str]:
    """The texts of a JSONL(.gz) file whose rows carry ``"text"``; with ``split``, only rows whose "split" field
    equals it (rows without the field count too). Another kind of source: every text (data/sources.py)."""
    name = str(path)
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        return list(iter_texts(DataConfig(source=name)))
    from ..formats.jsonl import read_jsonl

    return [row["text"] for _, row in read_jsonl(path)
            if isinstance(row.get("text"), str) and (not split or row.get("split", split) == split)]


def text_bpb_stages(run_dir, stages: list[str], path, split: str = "validation", max_tokens: int = 32768,
                    log=print) -> dict:
    """Bits per byte of each stage's model on the same held-out text (the first ``max_tokens`` tokens of its
    ``split`` rows) -> {stage: {"bpb", "loss", "tokens", "bytes", "change" (relative to the first stage)}}.
    A stage's figure is kept in RUN/eval/STAGE/bpb.json and read back while its weights and the settings
    match (pipeline.bpb_text)."""
    import json
    from pathlib import Path

    from ..store.checkpoint import stage_config
    from ..store.files import atomic_write_text
    from ..store.load import load_model
    from ..text.tokenizer import Tokenizer

    run_dir, out = Path(run_dir), {}
    tok, ids = Tokenizer.load(run_dir / "tokenizer.json"), None
    for stage in stages:
        settings = {"text": str(path), "split": split, "max_tokens": max_tokens,
                    "save_id": stage_config(run_dir / stage).get("save_id")}  # the stages given are finished
        cache = run_dir / "eval" / stage / "bpb.json"
        old = json.loads(cache.read_text()) if cache.exists() else {}
        if old.get("settings") == settings:
            res = old["result"]
        else:
            if ids is None:
                texts = split_texts(path, split)
                if not texts:
                    raise ValueError(f"pipeline.bpb_text: no texts in {path} (split {split!r})")
                ids = document_ids(tok, texts, max_tokens)
            log(f"[run] bits per byte of {stage} on {Path(path).name} ({min(len(ids), max_tokens)} tokens) ...")
            model = load_model(run_dir / stage, inference=True)[0]
            res = stream_loss(model, tok, ids, seq_len=min(1024, model.cfg.block_size), max_tokens=max_tokens)
            del model
            atomic_write_text(cache, json.dumps({"settings": settings, "result": res}, indent=2))
        first = out[next(iter(out))]["bpb"] if out else res["bpb"]
        out[stage] = {**res, "change": res["bpb"] / first - 1.0}
    return out


def bpb_markdown(res: dict) -> list[str]:
    """The report's section on held-out text: each stage's bits per byte and its change from the first."""
    if not res:
        return []
    first = next(iter(res))
    L = ["## Bits per byte on held-out text", "",
         f"The same {res[first]['tokens']:,} tokens of held-out text (pipeline.bpb_text) through every stage: what "
         "fine-tuning cost the model's knowledge of plain text.", "",
         f"| stage | bits per byte | change vs {first} |", "|---|---|---|"]
    L += [f"| {s} | {r['bpb']:.4f} | {r['change']:+.2%} |" for s, r in res.items()]
    return L + [""]
