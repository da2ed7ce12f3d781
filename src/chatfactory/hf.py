"""Hugging Face layouts: convert our GPT's config and weights to and from GPT-2 and Llama checkpoints.

Works on plain dicts and tensors, so the core never needs ``transformers``; tests compare our logits
with ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` built from the converted config.

    hf_cfg = to_hf_config(cfg)                      # dict for transformers' config.json
    hf_sd = to_hf_state_dict(model.state_dict(), cfg)
    sd = from_hf_state_dict(hf_model.state_dict(), from_hf_config(hf_cfg))

Whole directories (the ``export`` and ``import`` commands) need only ``safetensors`` and ``tokenizers``:

    export_run("runs/NAME", "sft", "out/hf")        # config.json, model.safetensors, tokenizer(.json,
                                                     # _config.json with the chat template), generation_config.json
    import_hf("path/to/hf_model", "runs/NAME")       # -> runs/NAME/{tokenizer.json, config.yaml, pretrain/}
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import GPTConfig


def to_hf_config(cfg: GPTConfig) -> dict:
    if cfg.flavour == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
            "n_layer": cfg.depth, "n_head": cfg.n_head, "n_inner": cfg.ffn_hidden,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": cfg.init_std, "tie_word_embeddings": True,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "attention_dropout": cfg.dropout, "initializer_range": cfg.init_std,
    }


def from_hf_config(h: dict) -> GPTConfig:
    kind = h.get("model_type")
    if kind == "gpt2":
        act = h.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 checkpoint uses activation {act!r}; only the tanh GELU is supported")
        d = h["n_embd"]
        return GPTConfig(flavour="gpt2", depth=h["n_layer"], vocab_size=h["vocab_size"], block_size=h["n_positions"],
                         n_embd=d, n_head=h["n_head"], ffn_hidden=h.get("n_inner") or 4 * d,
                         norm_eps=h.get("layer_norm_epsilon", 1e-5), dropout=h.get("resid_pdrop", 0.0))
    if kind in ("llama", "mistral", "qwen2"):
        if h.get("attention_bias") or h.get("mlp_bias") or h.get("tie_word_embeddings"):
            raise ValueError("Llama-layout checkpoint with biases or tied embeddings is not supported")
        rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not supported")
        theta = h.get("rope_theta", rope.get("rope_theta", 10000.0))
        n_head = h["num_attention_heads"]
        return GPTConfig(flavour="modern", depth=h["num_hidden_layers"], vocab_size=h["vocab_size"],
                         block_size=h.get("max_position_embeddings", 2048), n_embd=h["hidden_size"], n_head=n_head,
                         n_kv_head=h.get("num_key_value_heads") or n_head, ffn_hidden=h["intermediate_size"],
                         norm_eps=h.get("rms_norm_eps", 1e-6), rope_theta=theta)
    raise ValueError(f"unsupported Hugging Face model_type {kind!r} (GPT-2 and Llama layouts are)")


def _gpt2_names(i):
    return {
        f"blocks.{i}.norm1.weight": f"transformer.h.{i}.ln_1.weight", f"blocks.{i}.norm1.bias": f"transformer.h.{i}.ln_1.bias",
        f"blocks.{i}.norm2.weight": f"transformer.h.{i}.ln_2.weight", f"blocks.{i}.norm2.bias": f"transformer.h.{i}.ln_2.bias",
        f"blocks.{i}.attn.qkv.weight": f"transformer.h.{i}.attn.c_attn.weight", f"blocks.{i}.attn.qkv.bias": f"transformer.h.{i}.attn.c_attn.bias",
        f"blocks.{i}.attn.proj.weight": f"transformer.h.{i}.attn.c_proj.weight", f"blocks.{i}.attn.proj.bias": f"transformer.h.{i}.attn.c_proj.bias",
        f"blocks.{i}.mlp.fc.weight": f"transformer.h.{i}.mlp.c_fc.weight", f"blocks.{i}.mlp.fc.bias": f"transformer.h.{i}.mlp.c_fc.bias",
        f"blocks.{i}.mlp.proj.weight": f"transformer.h.{i}.mlp.c_proj.weight", f"blocks.{i}.mlp.proj.bias": f"transformer.h.{i}.mlp.c_proj.bias",
    }


def from_hf_state_dict(hf: dict, cfg: GPTConfig) -> dict:
    """Hugging Face GPT-2 / Llama weights -> our state dict (fresh tensors)."""
    sd = {}
    if cfg.flavour == "gpt2":
        sd["tok_emb.weight"] = hf["transformer.wte.weight"]
        sd["pos_emb.weight"] = hf["transformer.wpe.weight"]
        sd["norm_f.weight"], sd["norm_f.bias"] = hf["transformer.ln_f.weight"], hf["transformer.ln_f.bias"]
        for i in range(cfg.depth):
            for ours, theirs in _gpt2_names(i).items():
                w = hf[theirs]
                # GPT-2 stores its linear layers as Conv1D with (in, out) weights
                sd[ours] = w.t() if ours.endswith("weight") and w.dim() == 2 else w
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    else:
        sd["tok_emb.weight"] = hf["model.embed_tokens.weight"]
        sd["norm_f.weight"] = hf["model.norm.weight"]
        sd["lm_head.weight"] = hf["lm_head.weight"]
        for i in range(cfg.depth):
            p = f"model.layers.{i}."
            sd[f"blocks.{i}.norm1.weight"] = hf[p + "input_layernorm.weight"]
            sd[f"blocks.{i}.norm2.weight"] = hf[p + "post_attention_layernorm.weight"]
            sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], 0)
            sd[f"blocks.{i}.attn.proj.weight"] = hf[p + "self_attn.o_proj.weight"]
            sd[f"blocks.{i}.mlp.fc.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], 0)
            sd[f"blocks.{i}.mlp.proj.weight"] = hf[p + "mlp.down_proj.weight"]
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def to_hf_state_dict(sd: dict, cfg: GPTConfig) -> dict:
    """Our state dict -> Hugging Face GPT-2 / Llama names and shapes (tied head left out for GPT-2)."""
    hf = {}
    if cfg.flavour == "gpt2":
        hf["transformer.wte.weight"] = sd["tok_emb.weight"]
        hf["transformer.wpe.weight"] = sd["pos_emb.weight"]
        hf["transformer.ln_f.weight"], hf["transformer.ln_f.bias"] = sd["norm_f.weight"], sd["norm_f.bias"]
        for i in range(cfg.depth):
            for ours, theirs in _gpt2_names(i).items():
                w = sd[ours]
                hf[theirs] = w.t() if ours.endswith("weight") and w.dim() == 2 else w
    else:
        hf["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        hf["model.norm.weight"] = sd["norm_f.weight"]
        hf["lm_head.weight"] = sd["lm_head.weight"]
        qkv_split = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
        for i in range(cfg.depth):
            p = f"model.layers.{i}."
            hf[p + "input_layernorm.weight"] = sd[f"blocks.{i}.norm1.weight"]
            hf[p + "post_attention_layernorm.weight"] = sd[f"blocks.{i}.norm2.weight"]
            for n, w in zip("qkv", sd[f"blocks.{i}.attn.qkv.weight"].split(qkv_split, 0)):
                hf[p + f"self_attn.{n}_proj.weight"] = w
            hf[p + "self_attn.o_proj.weight"] = sd[f"blocks.{i}.attn.proj.weight"]
            gate, up = sd[f"blocks.{i}.mlp.fc.weight"].chunk(2, 0)
            hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"] = gate, up
            hf[p + "mlp.down_proj.weight"] = sd[f"blocks.{i}.mlp.proj.weight"]
    return {k: v.detach().clone().contiguous() for k, v in hf.items()}


# ---------------------------------------------------------------------------------------------------
# Whole-directory export and import
#
#   chatfactory export --run runs/NAME --stage sft --to DIR     (export_run)
#   chatfactory import --from DIR --out runs/NAME [--stage pretrain]   (import_hf)
#
# The exported directory loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and
# ``AutoTokenizer.from_pretrained(DIR)`` and no custom code; ``apply_chat_template`` renders exactly the
# ids of ``Tokenizer.render_chat`` / ``chat_prompt``.
# ---------------------------------------------------------------------------------------------------

# The chat template of tokenizer.py as Jinja. Special tokens are written out as text; the HF tokenizer
# matches them as added tokens, and the text between two of them is encoded on its own, exactly as
# ``render_chat`` encodes each message. (One difference: a message that *spells out* "<|end|>" becomes
# the special token under HF, but stays ordinary text under ``Tokenizer.encode``.)
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ' (expected system, user or assistant)') }}"
    "{% endif %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('a system message may only come first') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _hf_tokenizer_json(tok) -> str:
    """Our tokenizer.json plus a post-processor that opens a plain text with ``<|bos|>`` when
    ``add_special_tokens=True`` (transformers' default), as our pretraining documents are opened. The
    chat template writes its own ``<|bos|>`` and ``apply_chat_template`` tokenizes without specials."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    hf = HFTokenizer.from_str(tok.hf.to_str())
    hf.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", tok.bos_id)])
    return hf.to_str(pretty=True)


def export_run(run_dir, stage: str, out_dir) -> Path:
    """Write ``runs/NAME/<stage>`` as a Hugging Face model directory (GPT-2 or Llama by flavour)."""
    import json

    from safetensors.torch import save_file

    from .checkpoint import atomic_write_text, load_model
    from .tokenizer import Tokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    stage_dir = Path(stage) if Path(stage).is_dir() and not (run_dir / stage).exists() else run_dir / stage
    model, info = load_model(stage_dir)
    if info.get("kind") == "reward":
        raise ValueError(f"{stage_dir}: is a reward model (a scalar head); only language models export to a causal-LM layout")
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    cfg = model.cfg
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{run_dir / 'tokenizer.json'}: {tok.vocab_size} tokens but the model has only {cfg.vocab_size} embeddings")
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.end_id, "pad_token_id": tok.pad_id}
    hf_cfg = {**to_hf_config(cfg), **ids, "torch_dtype": "float32", "use_cache": True}
    atomic_write_text(out_dir / "config.json", json.dumps(hf_cfg, indent=2))
    tmp = out_dir / "model.safetensors.tmp"
    save_file(to_hf_state_dict(model.state_dict(), cfg), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / "model.safetensors")
    atomic_write_text(out_dir / "tokenizer.json", _hf_tokenizer_json(tok))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|end|>", "pad_token": "<|pad|>",
        "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"],
        "model_max_length": cfg.block_size, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tok_cfg, indent=2))
    atomic_write_text(out_dir / "special_tokens_map.json", json.dumps(
        {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")}, indent=2))
    gen = {**ids, "do_sample": False}
    atomic_write_text(out_dir / "generation_config.json", json.dumps(gen, indent=2))
    return out_dir


def _read_hf_tokenizer(src: Path):
    """The source's tokenizer as a ``tokenizers.Tokenizer`` (tokenizer.json, else via transformers)."""
    from tokenizers import Tokenizer as HFTokenizer

    if (src / "tokenizer.json").exists():
        try:
            return HFTokenizer.from_file(str(src / "tokenizer.json"))
        except Exception as e:
            raise ValueError(f"{src / 'tokenizer.json'}: not a valid tokenizer.json ({e})") from None
    try:  # e.g. GPT-2's vocab.json + merges.txt: transformers converts it to a fast tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(src)).backend_tokenizer
    except Exception as e:
        raise ValueError(f"{src}: no tokenizer.json and transformers could not load a tokenizer ({e})") from None


def import_hf(src_dir, out_run, stage: str = "pretrain") -> dict:
    """Bring a local Hugging Face GPT-2- or Llama-layout model and its tokenizer into ``out_run``.

    Writes ``out_run/tokenizer.json``, ``out_run/config.yaml`` (its ``model`` section is the imported
    architecture) and ``out_run/<stage>/`` (a final checkpoint, no resume state), so ``sft``, ``reward``
    and ``ppo`` can start from it with ``init_from``.

    A foreign tokenizer lacks our chat special tokens. Those it lacks are added as *added special
    tokens*; they take the next free ids after the tokenizer's vocabulary (ids the tokenizer already has
    keep their meaning, so the model's logits on them are unchanged). If that runs past the model's
    embedding table, the table (and the untied LM head) grows to fit; each new row is the mean of the
    existing rows, the usual choice that keeps the new tokens' logits ordinary until fine-tuning teaches
    them — except ``<|bos|>`` and ``<|end|>``, which copy the rows of the model's own ``bos_token_id`` and
    ``eos_token_id`` (config.json) when it has them, so "<|bos|> text" reads as the original "bos text"
    did and the model can already stop. Only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style) are accepted: bits-per-byte and
    streaming decode need each token's exact bytes.
    """
    import json

    from safetensors.torch import load_file
    from tokenizers import AddedToken, decoders

    from .checkpoint import save_checkpoint
    from .config import Config, save_config
    from .model import GPT
    from .tokenizer import SPECIAL_TOKENS, Tokenizer

    src, out_run = Path(src_dir), Path(out_run)
    cpath = src / "config.json"
    if not cpath.exists():
        raise FileNotFoundError(f"{cpath}: not found (expected a Hugging Face model directory)")
    try:
        h = json.loads(cpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cpath}: not valid JSON ({e})") from None
    try:
        cfg = from_hf_config(h)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{cpath}: missing or bad field {e}") from None
    except ValueError as e:
        raise ValueError(f"{cpath}: {e}") from None
    if h.get("head_dim") and h["head_dim"] != cfg.head_dim:
        raise ValueError(f"{cpath}: head_dim={h['head_dim']} differs from hidden_size/num_attention_heads={cfg.head_dim} (not supported)")

    # weights: one model.safetensors or the shards an index names (never pickles)
    files = [src / "model.safetensors"]
    if not files[0].exists():
        index = src / "model.safetensors.index.json"
        if not index.exists():
            raise FileNotFoundError(f"{src}: no model.safetensors (pytorch_model.bin is a pickle and is not read; "
                                    "re-save with save_pretrained(..., safe_serialization=True))")
        files = [src / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    hf_sd = {}
    for f in files:
        try:
            hf_sd.update(load_file(str(f)))
        except Exception as e:
            raise ValueError(f"{f}: corrupt or truncated safetensors ({e})") from None
    hf_sd = {k: v.float() for k, v in hf_sd.items()}
    if cfg.flavour == "modern" and "lm_head.weight" not in hf_sd:
        raise ValueError(f"{src}: Llama-layout weights without lm_head.weight (tied embeddings are not supported)")
    try:
        sd = from_hf_state_dict(hf_sd, cfg)
    except KeyError as e:
        raise ValueError(f"{src}: weights lack {e} for a {h.get('model_type')} model of depth {cfg.depth}") from None

    # tokenizer: add the chat special tokens it lacks, as special added tokens
    hf_tok = _read_hf_tokenizer(src)
    if not isinstance(hf_tok.decoder, decoders.ByteLevel):
        raise ValueError(f"{src}: tokenizer decoder is {type(hf_tok.decoder).__name__}; only byte-level BPE tokenizers are supported")
    missing = [t for t in SPECIAL_TOKENS if hf_tok.token_to_id(t) is None]
    hf_tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    hf_tok.post_processor = None  # our code places <|bos|> itself
    tok = Tokenizer(hf_tok)
    n = max(cfg.vocab_size, tok.vocab_size)
    grow = n - cfg.vocab_size
    # <|bos|> and <|end|> start as copies of the model's own bos / eos rows when it names them, so the
    # imported model reads "<|bos|> text" as it read "bos text" and already knows when to stop
    like = {"<|bos|>": h.get("bos_token_id"), "<|end|>": h.get("eos_token_id")}
    keys = ["tok_emb.weight"] + (["lm_head.weight"] if cfg.flavour == "modern" else [])
    for key in keys:
        w = sd[key]
        if grow:
            w = torch.cat([w, w.mean(0, keepdim=True).expand(grow, -1)], 0)
        mean = w[: cfg.vocab_size].mean(0)
        for t in missing:  # a padding row the checkpoint never trained may hold anything
            src_id = like.get(t)
            ok = isinstance(src_id, int) and 0 <= src_id < min(cfg.vocab_size, len(w)) and src_id not in tok.special.values()
            w[tok.special[t]] = w[src_id].clone() if ok else mean
        sd[key] = w.contiguous()
    if cfg.flavour == "gpt2":
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    cfg.vocab_size = n
    model = GPT(cfg)
    from .checkpoint import load_weights, unique_state_dict

    load_weights(model, sd, str(src))
    tok.save(out_run / "tokenizer.json")
    save_config(Config(model=cfg), out_run / "config.yaml")
    info = {"model": cfg.to_dict(), "kind": "imported", "source": str(src.resolve()), "added_tokens": missing}
    save_checkpoint(out_run / stage, unique_state_dict(model), info, state=None, step=0)
    return {"stage_dir": str(out_run / stage), "vocab_size": n, "added_tokens": missing, "flavour": cfg.flavour}
