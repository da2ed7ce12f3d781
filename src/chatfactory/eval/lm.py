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
    ids: list[int] = []
    for text in iter_texts(DataConfig(source=str(path), text_key=text_key)):
        ids += tok.document(text)
        if max_tokens and len(ids) > max_tokens:
            break
    return stream_loss(model, tok, ids, seq_len, batch_size, max_tokens)
