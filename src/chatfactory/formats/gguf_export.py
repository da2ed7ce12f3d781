"""A run's stage -> a GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs:
``chatfactory export --run R [--stage S] --to FILE.gguf --type f16|q8_0|q4_0``.

Written by the ``gguf`` package's writer (llama.cpp's own Python library). The architecture follows the model:
``llama`` for the modern flavour (q and k rows permuted for llama.cpp's interleaved RoPE, as its converter
does; formats/gguf.py's import undoes it), ``qwen2`` where q/k/v have biases, ``qwen3`` with q/k norms,
``gpt2`` for the gpt2 flavour.
The tokenizer goes in as llama.cpp's ``gpt2``-type BPE: tokens, merges, token types (special tokens as
control tokens), the pre-tokenizer by the name llama.cpp knows it by (a split it has no name for is an
error naming it), bos / end-of-turn / pad ids, and the run's Jinja chat template (``add_bos_token`` off where
the template opens with bos itself: ``file_adds_bos``). A LoRA stage is exported with its adapters merged; a
quantized stage is refused (export its full-precision source).

Types: ``f16`` (every matrix in f16, norms and biases f32), ``q8_0`` (matrices in Q8_0), ``q4_0`` (block
matrices in Q4_0, the token embedding and the output matrix in Q8_0, as llama.cpp keeps those two finer);
a matrix whose rows are not a multiple of 32 wide stays f16.

    export_gguf("runs/demo", "sft", "demo-sft.q8_0.gguf", "q8_0")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .gguf import PRE_TOKENIZERS, GGUFError, _linears, _others, _permute

TYPES = ("f16", "q8_0", "q4_0")


def pre_tokenizer_name(tok) -> str:
    """The name llama.cpp knows our tokenizer's pre-tokenizer by, or GGUFError saying what it is."""
    pre = json.loads(tok.hf.to_str()).get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's split inside ByteLevel: ours, GPT-2's
    parts = pre.get("pretokenizers", []) if kind == "Sequence" else []
    if [p.get("type") for p in parts] == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") \
            and parts[1].get("use_regex", True):
        return "smollm"  # SmolLM2's Hugging Face tokenizer: digits one by one, then GPT-2's split
    if parts and parts[-1].get("type") == "ByteLevel" and not parts[-1].get("use_regex", True) \
            and all(p.get("type") == "Split" and p.get("behavior") == "Isolated" for p in parts[:-1]):
        regexes = [p["pattern"].get("Regex") for p in parts[:-1]]
        for name in ("gpt-2", "smollm", "llama-bpe", "qwen2"):  # (the names llama.cpp's vocabulary knows)
            if regexes == PRE_TOKENIZERS[name]:
                return name
    raise GGUFError(f"the tokenizer's pre-tokenizer has no llama.cpp name: {json.dumps(pre)[:300]} (llama.cpp knows "
                    f"GPT-2's split ('gpt-2'), SmolLM2's ('smollm'), Llama 3's ('llama-bpe') and Qwen2's ('qwen2'))")


def file_adds_bos(tok) -> bool:
    """The file's ``add_bos_token``: the tokenizer's, except where the chat template opens with bos itself (ours
    does). llama.cpp adds bos to a templated prompt when the file says so, and the server of llama-cpp-python
    0.3.16 does not strip the template's own: the chat prompt would open with two. Plain text then opens
    without bos in llama.cpp."""
    text = tok.template.render_text([{"role": "user", "content": "x"}], True)
    return tok.add_bos and not text.startswith(tok.chat_config["bos_token"])


def _merges(tok) -> list[str]:
    model = json.loads(tok.hf.to_str())["model"]
    if model.get("type") != "BPE":
        raise GGUFError(f"the tokenizer is {model.get('type')}, not byte-level BPE: llama.cpp's gpt2 vocabulary "
                        "cannot hold it")
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def _vocab(tok, rows: int) -> tuple[list[str], list[int]]:
    """Tokens by id and llama.cpp's token types (1 normal, 3 control, 4 user-defined, 5 unused), padded with
    unused ``[PAD<i>]`` tokens to the embedding's rows (a table padded past the tokenizer, as imports may be)."""
    import gguf

    vocab = tok.hf.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise GGUFError("the tokenizer's ids are not contiguous from 0: llama.cpp needs one token per id")
    added = {t.content: t.special for t in tok.hf.get_added_tokens_decoder().values()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(len(by_id)):
        t = by_id[i]
        tokens.append(t)
        types.append(int(T.CONTROL if t in tok.special or added.get(t) else T.USER_DEFINED if t in added
                         else T.NORMAL))
    if rows < len(tokens):
        raise GGUFError(f"the model has {rows} embedding rows for {len(tokens)} tokens")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), rows)]
    types += [int(T.UNUSED)] * (rows - len(types))
    return tokens, types


def _tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """The file's tensor names -> fp32 tensors in llama.cpp's layout."""
    cfg, sd = model.cfg, {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {}
    if arch == "gpt2":
        out["token_embd.weight"], out["position_embd.weight"] = sd["tok_emb.weight"], sd["pos_emb.weight"]
        names = {"norm1": "attn_norm", "attn.qkv": "attn_qkv", "attn.proj": "attn_output", "norm2": "ffn_norm",
                 "mlp.fc": "ffn_up", "mlp.proj": "ffn_down"}
        for i in range(cfg.depth):
            for ours, theirs in names.items():
                for kind in ("weight", "bias"):
                    out[f"blk.{i}.{theirs}.{kind}"] = sd[f"blocks.{i}.{ours}.{kind}"]
        out["output_norm.weight"], out["output_norm.bias"] = sd["norm_f.weight"], sd["norm_f.bias"]
        if not cfg.tie_embeddings and "lm_head.weight" in sd:
            out["output.weight"] = sd["lm_head.weight"]
        return out
    for ours, names in _others(arch, cfg).items():  # norms, embedding, biases, an untied head
        sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim] \
            if len(names) == 3 else [sd[ours].size(0)]
        for name, part in zip(names, sd[ours].split(sizes)):
            out[name] = part
    for ours, parts in _linears(arch, cfg).items():
        w = sd[ours + ".weight"]
        sizes = {"attn.qkv": [cfg.n_head * cfg.head_dim] + [cfg.n_kv_head * cfg.head_dim] * 2,
                 "mlp.fc": [w.size(0) // 2] * 2}.get(ours.split(".", 2)[2], [w.size(0)])
        for (name, heads), part in zip(parts, w.split(sizes)):
            out[name] = _permute(part, heads) if heads else part
    return out


def _encode(name: str, t: torch.Tensor, qtype: str) -> tuple[np.ndarray, object]:
    """-> (the data to write, its GGML type or None for the array's own)."""
    import gguf

    a = t.numpy().astype(np.float32)
    if a.ndim < 2:
        return a, None  # norms and biases: f32, as llama.cpp's converter keeps them
    Q = gguf.GGMLQuantizationType
    kind = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    if kind == Q.Q4_0 and name in ("token_embd.weight", "output.weight"):
        kind = Q.Q8_0
    if kind == Q.F16 or a.shape[-1] % 32:
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, kind), kind


def export_gguf(run_dir, stage: str, out, qtype: str = "f16") -> dict:
    """Write ``run_dir/stage`` as the GGUF file ``out`` (through ``out.tmp`` and a rename: a failure leaves no
    file, or the one that was there) -> what it wrote."""
    import gguf

    from ..store.files import write_file
    from ..store.load import load_model
    from ..text.tokenizer import Tokenizer

    if qtype not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}, got {qtype!r}")
    run_dir = Path(run_dir)
    model, info = load_model(run_dir / stage)  # adapters merged; a quantized stage is refused there
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    cfg = model.cfg
    if cfg.qk_norm and cfg.qkv_bias:
        raise GGUFError("q/k norms with q/k/v biases: no llama.cpp architecture has both (Qwen3 has no biases)")
    arch = "gpt2" if cfg.flavour == "gpt2" else "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    pre = pre_tokenizer_name(tok)
    tokens, types = _vocab(tok, cfg.vocab_size)
    chat = tok.chat_config
    merges = _merges(tok)
    add_bos = file_adds_bos(tok)
    tensors = {name: _encode(name, t, qtype) for name, t in _tensors(model, arch).items()}
    out = Path(out)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(f"{run_dir.name}/{stage} (chatfactory)")
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.depth)
        w.add_feed_forward_length(cfg.ffn_hidden)
        w.add_head_count(cfg.n_head)
        w.add_vocab_size(cfg.vocab_size)
        if arch == "gpt2":
            w.add_layer_norm_eps(cfg.norm_eps)
        else:
            w.add_head_count_kv(cfg.n_kv_head)
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                         "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.end_id)
        w.add_eot_token_id(tok.end_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(add_bos)
        w.add_chat_template(chat["chat_template"])
        for name, (data, kind) in tensors.items():
            w.add_tensor(name, data, raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    write_file(out, tmp, write, "the GGUF file")
    os.replace(tmp, out)
    kinds = sorted({kind.name if kind is not None else {np.float16: "F16", np.float32: "F32"}[data.dtype.type]
                    for data, kind in tensors.values()})
    return {"path": str(out), "architecture": arch, "pre_tokenizer": pre, "type": qtype, "tensors": len(tensors),
            "bytes": out.stat().st_size, "lora_merged": bool(info.get("lora")), "types": kinds, "add_bos": add_bos}

