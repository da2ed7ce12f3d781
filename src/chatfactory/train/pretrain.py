"""Pretraining: next-token prediction on raw text (GPT's step zero).

Trains (or reuses) the run's tokenizer, tokenizes the text once into shards, builds the GPT and runs
the shared loop. Validation reports loss in nats per token and bits per byte — the latter divides by
the UTF-8 bytes the targets stand for, so models with different tokenizers compare fairly.

    chatfactory pretrain --config tiny --out runs/tiny
    torchrun --nproc_per_node=2 -m chatfactory.cli pretrain --config tiny --out runs/tiny
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..config import Config, save_config
from ..data.shards import PretrainBatches, build_shards, open_split, val_batches
from ..data.sources import iter_texts
from ..model.gpt import GPT
from ..text.tokenizer import Tokenizer
from .loop import Dist, Stage, all_reduce_sum, setup_dist, train


def ensure_tokenizer(cfg: Config, run_dir, d: Dist | None = None) -> Tokenizer:
    """The run's tokenizer: loaded if ``tokenizer.json`` exists, else trained on the data (rank 0)."""
    path = Path(run_dir) / "tokenizer.json"
    if not path.exists() and (d is None or d.main):
        tc = cfg.tokenizer
        capped = dataclasses.replace(cfg.data, max_chars=min(cfg.data.max_chars or tc.train_chars, tc.train_chars))
        print(f"training a {tc.vocab_size}-token byte-level BPE on up to {capped.max_chars:,} characters of "
              f"{cfg.data.source}")
        Tokenizer.train(iter_texts(capped), tc.vocab_size, tc.min_frequency).save(path)
    _barrier(d)
    return Tokenizer.load(path)


def _barrier(d):
    if d is not None and d.world > 1:
        torch.distributed.barrier()


class PretrainStage(Stage):
    name = "pretrain"

    def __init__(self, cfg: Config, data_dir, tok: Tokenizer, model_config: dict):
        tc = cfg.pretrain
        self.tc, self.seq_len, self.model_config = tc, tc.seq_len, model_config
        self.train_batches = PretrainBatches(open_split(data_dir, "train"), tc.seq_len, tc.seed)
        self.val = open_split(data_dir, "val")
        self.token_bytes = torch.tensor([len(b) for b in tok.token_bytes], dtype=torch.float64)

    def micro_batch(self, step, micro, rank, world):
        return self.train_batches.micro_batch(step, micro, self.tc.grad_accum, self.tc.batch_size, rank, world)

    def loss(self, model, batch):
        x, y = batch
        return model(x, targets=y)

    def token_count(self, batch):
        return batch[0].numel()

    def evaluate(self, model, d):
        if len(self.val) < self.seq_len + 1:
            return {}
        nll = torch.zeros((), dtype=torch.float64)
        n_tok = torch.zeros((), dtype=torch.float64)
        n_bytes = torch.zeros((), dtype=torch.float64)
        # eval_batches global batches: the same windows for one process or many
        n_windows = self.tc.eval_batches * self.tc.batch_size * self.tc.grad_accum * d.world
        for x, y in val_batches(self.val, self.seq_len, self.tc.batch_size, n_windows, d.rank, d.world):
            logits = model(x.to(d.device))
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(d.device).flatten(),
                                                     reduction="sum")
            nll += loss.double().cpu()
            n_tok += y.numel()
            n_bytes += self.token_bytes[y].sum()
        tot = all_reduce_sum(torch.stack([nll, n_tok, n_bytes]).to(d.device)).cpu()
        return {"val_loss": (tot[0] / tot[1]).item(), "val_bpb": (tot[0] / math.log(2) / tot[2]).item()}


def run_pretrain(cfg: Config, run_dir) -> dict:
    """Tokenizer, shards, model, training; writes ``run_dir/pretrain``. Safe to re-run: it resumes."""
    run_dir = Path(run_dir)
    d = setup_dist(cfg.pretrain.device)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    tok = ensure_tokenizer(cfg, run_dir, d)
    if d.main:
        meta = build_shards(iter_texts(cfg.data), tok, run_dir / "data", cfg.data, progress=cfg.pretrain.progress)
        print(f"data: {sum(f['tokens'] for f in meta['train']):,} train tokens, "
              f"{meta['val']['tokens']:,} validation tokens")
    _barrier(d)
    mcfg = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size)
    if cfg.pretrain.seq_len > mcfg.block_size:
        raise ValueError(f"pretrain.seq_len={cfg.pretrain.seq_len} exceeds model.block_size={mcfg.block_size}")
    torch.manual_seed(cfg.pretrain.seed)
    model = GPT(mcfg)
    if d.main:
        print(f"model: {mcfg.flavour}, depth {mcfg.depth}, width {mcfg.n_embd}, {mcfg.n_head} heads, "
              f"{model.num_params() / 1e6:.2f}M parameters, "
              f"{model.flops_per_token(cfg.pretrain.seq_len) / 1e6:.1f} MFLOP/token")
    stage = PretrainStage(cfg, run_dir / "data", tok, mcfg.to_dict())
    result = train(stage, model, cfg.pretrain, run_dir / "pretrain", d)
    if d.world > 1:
        torch.distributed.destroy_process_group()
    return result
