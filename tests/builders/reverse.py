"""The reverse-three-letters chat task ("reverse: a b c" -> "c b a") of the SFT, LoRA and FSDP tests, and a
run directory to train it in."""
import json
import random

import torch

from builders import write_jsonl
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.text.tokenizer import Tokenizer

LETTERS = "abcdefghij"
SYS = {"role": "system", "content": "You reverse letters."}


def reverse_task(rng, n):
    rows = []
    for _ in range(n):
        w = rng.sample(LETTERS, 3)
        rows.append(({"role": "user", "content": "reverse: " + " ".join(w)}, " ".join(reversed(w))))
    return rows


def make_reverse_run(tmp_path, n=1400, n_test=100):
    """A run directory holding a tokenizer and a randomly initialised "pretrain" stage, plus chat data
    for the reverse-3-letters task; returns (run, data path, tokenizer, held-out (user, answer) rows)."""
    rng = random.Random(0)
    all_rows = reverse_task(rng, n)
    held = {r[0]["content"] for r in all_rows[-n_test:]}
    train_rows = [r for r in all_rows[:-n_test] if r[0]["content"] not in held]
    data = [{"messages": [SYS, u, {"role": "assistant", "content": a}]} for u, a in train_rows]
    path = write_jsonl(tmp_path / "train.jsonl", data)
    run = tmp_path / "run"
    tok = Tokenizer.train([json.dumps(r) for r in data[:200]] + [" ".join(LETTERS)], vocab_size=400)
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    mcfg = GPTConfig(depth=2, n_embd=96, head_dim=32, vocab_size=tok.vocab_size, block_size=64)
    save_checkpoint(run / "pretrain", unique_state_dict(GPT(mcfg)), {"stage": "pretrain", "model": mcfg.to_dict()})
    return run, path, tok, all_rows[-n_test:]


def sft_args(data, *extra):
    """`chatfactory sft` overrides for the task's data (add steps, evaluation and checkpoint settings)."""
    return [f"sft.data={data}", "sft.batch_size=16", "sft.seq_len=64", "sft.lr=3e-3", "sft.progress=false",
            "sft.device=cpu", *extra]
