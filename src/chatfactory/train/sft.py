"""Supervised fine-tuning (InstructGPT's step 1): teach a pretrained GPT to answer in turns.

Conversations (data/chat.py) render through the chat template to ids plus a loss mask that is 1 on
assistant text and its ``<|end|>`` only; the loss is next-token cross-entropy on those targets alone,
so the model learns to answer, not to imitate users. Several conversations are packed into each row
of ``seq_len`` tokens (best-fit, so little is padding); a block-diagonal causal mask and positions
that restart at every conversation keep packed conversations from seeing each other, so a packed row
trains exactly like the same conversations one by one. Validation reports the mean loss on the
assistant tokens of held-out conversations.

Runs on the shared loop (train/loop.py): same exact resume and torchrun DDP as pretraining. With
``lora.rank`` > 0 only low-rank adapters train (model/lora.py).

    chatfactory sft --config dolly --out runs/dolly            # after `chatfactory pretrain` on the same run
    torchrun --nproc_per_node=2 -m chatfactory.cli sft --config dolly --out runs/dolly
"""

from __future__ import annotations

import bisect
import shutil
from pathlib import Path

import numpy as np
import torch

from ..config import Config, SFTConfig, save_config
from ..data.chat import load_conversations
from ..inference.calculator import forced_mask
from ..model.lora import apply_lora, lora_settings, summary
from ..store.checkpoint import resolve_stage
from ..store.files import CheckpointError
from ..store.load import load_model
from ..text.tokenizer import Tokenizer
from .loop import Dist, Stage, all_reduce_sum, setup_dist, train

IGNORE = -100


def tokenize_conversations(convs, tok: Tokenizer, seq_len: int) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """Render each conversation to (ids, targets): ``targets[i]`` is ``ids[i+1]`` where the mask says
    to learn it, else IGNORE. A conversation longer than ``seq_len + 1`` tokens is cut to fit; one
    left with no assistant target is dropped. Returns inputs, targets and counts of what happened."""
    xs, ys, stats = [], [], {"conversations": len(convs), "truncated": 0, "dropped": 0}
    for conv in convs:
        ids, mask = tok.render_chat(conv)
        # a calculator's results are the engine's, written into the reply: the model learns the call and what
        # follows the result, never the result itself (inference/calculator.py)
        mask = [0 if f else m for m, f in zip(mask, forced_mask(tok, ids))]
        if len(ids) > seq_len + 1:
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            stats["truncated"] += 1
        ids_a = np.asarray(ids, dtype=np.int64)
        tgt = np.where(np.asarray(mask[1:], dtype=bool), ids_a[1:], IGNORE)
        if not (tgt != IGNORE).any():
            stats["dropped"] += 1
            continue
        xs.append(ids_a[:-1])
        ys.append(tgt)
    return xs, ys, stats


def pack(sizes: list[int], order, capacity: int) -> list[list[int]]:
    """Best-fit packing: each item (in ``order``) goes into the open row with the least room that
    still holds it, else a new row. Returns rows as lists of item indices."""
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (free slots, row), sorted
    for i in order:
        n = sizes[i]
        k = bisect.bisect_left(open_rows, (n, -1))
        if k < len(open_rows):
            free, r = open_rows.pop(k)
            rows[r].append(i)
        else:
            free, r = capacity, len(rows)
            rows.append([i])
        if free - n > 0:
            bisect.insort(open_rows, (free - n, r))
    return rows


def collate(rows: list[list[int]], xs, ys, seq_len: int, pad_id: int) -> dict:
    """Packed rows -> tensors: x, y (IGNORE on pads and non-assistant targets), per-conversation
    positions, and ``doc`` (which conversation each slot holds; -1 for padding) for the mask."""
    B = len(rows)
    x = torch.full((B, seq_len), pad_id, dtype=torch.long)
    y = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    doc = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for j, i in enumerate(row):
            n = len(xs[i])
            x[b, at : at + n] = torch.from_numpy(xs[i])
            y[b, at : at + n] = torch.from_numpy(ys[i])
            pos[b, at : at + n] = torch.arange(n)
            doc[b, at : at + n] = j
            at += n
    return {"x": x, "y": y, "pos": pos, "doc": doc}


def packed_mask(doc: torch.Tensor) -> torch.Tensor:
    """(B, T) conversation ids -> (B, 1, T, T) bool: causal within a conversation, nothing across.
    Padding (-1) sees earlier padding, so no query row is empty (an empty row would give NaN)."""
    T = doc.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class PackedBatches:
    """Stateless: the rows of global sample index k are a pure function of (seed, k). Every epoch
    shuffles the conversations with a generator seeded by (seed, epoch) and packs them afresh."""

    def __init__(self, xs, ys, seq_len: int, pad_id: int, seed: int):
        if not xs:
            raise ValueError("no training conversations left to fine-tune on")
        self.xs, self.ys, self.T, self.pad_id, self.seed = xs, ys, seq_len, pad_id, seed
        self.sizes = [len(x) for x in xs]
        self._rows: dict[int, list[list[int]]] = {}
        self._counts: list[int] = []

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._rows:
            if len(self._rows) > 2:
                self._rows.pop(min(self._rows))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            rows = pack(self.sizes, torch.randperm(len(self.xs), generator=g).tolist(), self.T)
            # best-fit leaves the fullest rows first; shuffle so every step mixes lengths
            self._rows[epoch] = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
        return self._rows[epoch]

    def row(self, k: int) -> list[int]:
        epoch = 0
        while True:
            if epoch == len(self._counts):
                self._counts.append(len(self.epoch_rows(epoch)))
            if k < self._counts[epoch]:
                return self.epoch_rows(epoch)[k]
            k -= self._counts[epoch]
            epoch += 1

    def micro_batch(self, step, micro, grad_accum, batch_size, rank=0, world=1) -> dict:
        per_step = batch_size * world * grad_accum
        first = step * per_step + micro * batch_size * world + rank * batch_size
        return collate([self.row(first + b) for b in range(batch_size)], self.xs, self.ys, self.T, self.pad_id)


def masked_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on the assistant targets of a packed batch."""
    return model(batch["x"], targets=batch["y"], positions=batch["pos"], attn_mask=packed_mask(batch["doc"]),
                 ignore_index=IGNORE, reduction=reduction)


class SFTStage(Stage):
    name = "sft"

    def __init__(self, tc: SFTConfig, train_data, val_data, pad_id: int, model_config: dict):
        self.tc, self.seq_len, self.model_config, self.pad_id = tc, tc.seq_len, model_config, pad_id
        self.batches = PackedBatches(*train_data, tc.seq_len, pad_id, tc.seed)
        vx, vy = val_data
        self.val_x, self.val_y = vx, vy
        self.val_rows = pack([len(x) for x in vx], range(len(vx)), tc.seq_len) if vx else []

    def micro_batch(self, step, micro, rank, world):
        return self.batches.micro_batch(step, micro, self.tc.grad_accum, self.tc.batch_size, rank, world)

    def loss(self, model, batch):
        return masked_loss(model, batch)

    def token_count(self, batch):
        return int((batch["doc"] >= 0).sum())

    def flops(self, model, batch):
        # the LM head runs on the assistant targets alone (GPT.forward)
        return model.flops(self.token_count(batch), int((batch["y"] != IGNORE).sum()), self.seq_len)

    def evaluate(self, model, d: Dist) -> dict:
        if not self.val_rows:
            return {}
        n_rows = self.tc.eval_batches * self.tc.batch_size * self.tc.grad_accum * d.world
        mine = self.val_rows[:n_rows][d.rank :: d.world]
        tot = torch.zeros(2, dtype=torch.float64, device=d.device)
        for i in range(0, len(mine), self.tc.batch_size):
            batch = collate(mine[i : i + self.tc.batch_size], self.val_x, self.val_y, self.seq_len, self.pad_id)
            batch = {k: v.to(d.device) for k, v in batch.items()}
            tot[0] += masked_loss(model, batch, reduction="sum").double()
            tot[1] += (batch["y"] != IGNORE).sum()
        tot = all_reduce_sum(tot)
        return {"val_loss": (tot[0] / tot[1].clamp(min=1)).item()}


def split_conversations(convs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the last ``val_fraction`` (at least one, if asked for) is held out."""
    order = torch.randperm(len(convs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(convs) - 1, max(1, round(len(convs) * val_fraction))) if val_fraction > 0 else 0
    return [convs[i] for i in order[: len(order) - n_val]], [convs[i] for i in order[len(order) - n_val :]]


def run_sft(cfg: Config, run_dir) -> dict:
    """Fine-tune ``sft.init_from`` on ``sft.data``; writes ``run_dir/sft``. Safe to re-run: it resumes."""
    tc = cfg.sft
    # data.chat_holdout's slice is never trained on (pretraining may validate on it; data/chat.py)
    convs = load_conversations(tc.data, tc.max_rows, tc.hf_split, cfg.data.chat_holdout)
    held = f"; data.chat_holdout's {cfg.data.chat_holdout:.0%} slice left out" if cfg.data.chat_holdout else ""
    return fine_tune(cfg, run_dir, "sft", convs, f"from {tc.data}", held)


def fine_tune(cfg: Config, run_dir, name: str, convs: list, source: str, note: str = "", src=None,
              out=None) -> dict:
    """The SFT loss (assistant tokens) on ``convs``, from ``src`` (default ``cfg.<name>.init_from``), with
    ``cfg.<name>``'s training settings; writes ``out`` (default ``run_dir/<name>``). SFT runs it on
    demonstrations, RFT on the policy's own best answers. Safe to re-run: it resumes."""
    run_dir = Path(run_dir)
    tc = getattr(cfg, name)
    lora = lora_settings(cfg, name)
    d = setup_dist(tc.device)
    src = Path(src) if src is not None else resolve_stage(run_dir, tc.init_from, f"{name}.init_from")
    tok_path = run_dir / "tokenizer.json"
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():
            save_config(cfg, run_dir / "config.yaml")
        if not tok_path.exists() and (src.parent / "tokenizer.json").exists():
            shutil.copyfile(src.parent / "tokenizer.json", tok_path)  # an imported stage brings its tokenizer
    if d.world > 1:
        torch.distributed.barrier()
    tok = Tokenizer.load(tok_path)
    model, _ = load_model(src)
    if model.cfg.vocab_size < tok.vocab_size:
        raise CheckpointError(f"{src}: model vocabulary ({model.cfg.vocab_size}) is smaller than "
                              f"{tok_path} ({tok.vocab_size})")
    if tc.seq_len > model.cfg.block_size:
        raise ValueError(f"{name}.seq_len={tc.seq_len} exceeds the model's block_size={model.cfg.block_size}")

    train_convs, val_convs = split_conversations(convs, tc.val_fraction, tc.seed)
    tx, ty, stats = tokenize_conversations(train_convs, tok, tc.seq_len)
    vx, vy, _ = tokenize_conversations(val_convs, tok, tc.seq_len)
    stage = SFTStage(tc, (tx, ty), (vx, vy), tok.pad_id, model.cfg.to_dict())
    stage.name = name
    if lora:
        apply_lora(model, lora, tc.seed)
        stage.info = {"lora": lora}
    if d.main:
        n_tok = sum(len(x) for x in tx)
        n_rows = len(stage.batches.epoch_rows(0))
        print(f"{name}: {len(tx):,} train / {len(vx):,} held-out conversations {source} "
              f"({stats['truncated']} cut to {tc.seq_len} tokens, {stats['dropped']} dropped); "
              f"{n_tok:,} tokens packed into {n_rows:,} rows ({n_tok / (n_rows * tc.seq_len):.0%} full); "
              f"starting from {src}" + (f"; {summary(model)}" if lora else "") + note)
    result = train(stage, model, tc, Path(out) if out is not None else run_dir / name, d)
    if d.world > 1:
        torch.distributed.destroy_process_group()
    return result
