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

from ..model.gpt import GPTConfig


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
    # q/k norms are Qwen3's layout; biases on q/k/v only are Qwen2's (Llama's attention_bias would put one on
    # o_proj too, Qwen3's too)
    if cfg.qk_norm and cfg.qkv_bias:
        raise ValueError("q/k norms with q/k/v biases have no Hugging Face layout (Qwen3 has no biases)")
    family = ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
               "use_sliding_window": False} if cfg.qk_norm else
              {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False}
              if cfg.qkv_bias else {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                    "attention_bias": False, "mlp_bias": False})
    return {
        **family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
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
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        # Qwen2 always has q/k/v biases (its config has no switch); Llama's (and Qwen3's) attention_bias also
        # biases o_proj
        if h.get("mlp_bias") or (kind != "qwen2" and h.get("attention_bias")):
            raise ValueError(f"{kind} checkpoint with attention_bias/mlp_bias is not supported")
        rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not supported")
        theta = h.get("rope_theta", rope.get("rope_theta", 10000.0))
        n_head = h["num_attention_heads"]
        return GPTConfig(flavour="modern", depth=h["num_hidden_layers"], vocab_size=h["vocab_size"],
                         block_size=h.get("max_position_embeddings", 2048), n_embd=h["hidden_size"], n_head=n_head,
                         n_kv_head=h.get("num_key_value_heads") or n_head, ffn_hidden=h["intermediate_size"],
                         head_dim=h.get("head_dim") or 0, norm_eps=h.get("rms_norm_eps", 1e-6), rope_theta=theta,
                         tie_embeddings=bool(h.get("tie_word_embeddings", False)), qkv_bias=kind == "qwen2",
                         qk_norm=kind == "qwen3")
    raise ValueError(f"unsupported Hugging Face model_type {kind!r} (gpt2, llama, mistral, qwen2 and qwen3 are)")


def _gpt2_names(i):
    return {
        f"blocks.{i}.norm1.weight": f"transformer.h.{i}.ln_1.weight",
        f"blocks.{i}.norm1.bias": f"transformer.h.{i}.ln_1.bias",
        f"blocks.{i}.norm2.weight": f"transformer.h.{i}.ln_2.weight",
        f"blocks.{i}.norm2.bias": f"transformer.h.{i}.ln_2.bias",
        f"blocks.{i}.attn.qkv.weight": f"transformer.h.{i}.attn.c_attn.weight",
        f"blocks.{i}.attn.qkv.bias": f"transformer.h.{i}.attn.c_attn.bias",
        f"blocks.{i}.attn.proj.weight": f"transformer.h.{i}.attn.c_proj.weight",
        f"blocks.{i}.attn.proj.bias": f"transformer.h.{i}.attn.c_proj.bias",
        f"blocks.{i}.mlp.fc.weight": f"transformer.h.{i}.mlp.c_fc.weight",
        f"blocks.{i}.mlp.fc.bias": f"transformer.h.{i}.mlp.c_fc.bias",
        f"blocks.{i}.mlp.proj.weight": f"transformer.h.{i}.mlp.c_proj.weight",
        f"blocks.{i}.mlp.proj.bias": f"transformer.h.{i}.mlp.c_proj.bias",
    }


def _renamed(cfg: GPTConfig) -> dict:
    """Our name -> Hugging Face's, for every tensor that only changes name (GPT-2's linear weights also
    change layout: see ``_conv1d``); Llama's fused qkv and gate+up are split and joined by the callers."""
    if cfg.flavour == "gpt2":
        names = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
                 "norm_f.weight": "transformer.ln_f.weight", "norm_f.bias": "transformer.ln_f.bias"}
        for i in range(cfg.depth):
            names.update(_gpt2_names(i))
        return names
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:  # a tied head is the embedding; transformers ties it on load
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.depth):
        p = f"model.layers.{i}."
        names.update({f"blocks.{i}.norm1.weight": p + "input_layernorm.weight",
                      f"blocks.{i}.norm2.weight": p + "post_attention_layernorm.weight",
                      f"blocks.{i}.attn.proj.weight": p + "self_attn.o_proj.weight",
                      f"blocks.{i}.mlp.proj.weight": p + "mlp.down_proj.weight"})
        if cfg.qk_norm:
            names.update({f"blocks.{i}.attn.q_norm.weight": p + "self_attn.q_norm.weight",
                          f"blocks.{i}.attn.k_norm.weight": p + "self_attn.k_norm.weight"})
    return names


def _conv1d(cfg: GPTConfig, ours: str, w):
    """GPT-2 stores the linear layers of its blocks as Conv1D, with (in, out) weights: transposed both ways."""
    return (w.t() if cfg.flavour == "gpt2" and ours.startswith("blocks.") and ours.endswith("weight") and w.dim() == 2
            else w)


def from_hf_state_dict(hf: dict, cfg: GPTConfig) -> dict:
    """Hugging Face GPT-2 / Llama weights -> our state dict (fresh tensors)."""
    sd = {ours: _conv1d(cfg, ours, hf[theirs]) for ours, theirs in _renamed(cfg).items()}
    if cfg.flavour == "gpt2":
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    else:
        for i in range(cfg.depth):
            p = f"model.layers.{i}."
            sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], 0)
            if cfg.qkv_bias:
                sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat([hf[p + f"self_attn.{n}_proj.bias"] for n in "qkv"], 0)
            sd[f"blocks.{i}.mlp.fc.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"],
                                                         hf[p + "mlp.up_proj.weight"]], 0)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def to_hf_state_dict(sd: dict, cfg: GPTConfig) -> dict:
    """Our state dict -> Hugging Face GPT-2 / Llama names and shapes (tied head left out for GPT-2)."""
    hf = {theirs: _conv1d(cfg, ours, sd[ours]) for ours, theirs in _renamed(cfg).items()}
    if cfg.flavour != "gpt2":
        qkv_split = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
        for i in range(cfg.depth):
            p = f"model.layers.{i}."
            for n, w in zip("qkv", sd[f"blocks.{i}.attn.qkv.weight"].split(qkv_split, 0)):
                hf[p + f"self_attn.{n}_proj.weight"] = w
            if cfg.qkv_bias:
                for n, b in zip("qkv", sd[f"blocks.{i}.attn.qkv.bias"].split(qkv_split, 0)):
                    hf[p + f"self_attn.{n}_proj.bias"] = b
            gate, up = sd[f"blocks.{i}.mlp.fc.weight"].chunk(2, 0)
            hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"] = gate, up
    return {k: v.detach().clone().contiguous() for k, v in hf.items()}


# ---------------------------------------------------------------------------------------------------
# Whole-directory export and import
#
#   chatfactory export --run runs/NAME --stage sft --to DIR     (export_run)
#   chatfactory import --from DIR --out runs/NAME [--stage pretrain]   (import_hf; gguf.import_gguf for a file)
#
# The exported directory loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and
# ``AutoTokenizer.from_pretrained(DIR)`` and no custom code; ``apply_chat_template`` renders exactly the
# ids of ``Tokenizer.render_chat`` / ``chat_prompt`` (the run's template: ours, or the imported model's).
# One difference, on purpose: a message that *spells out* a special token gets the control token under
# transformers, but stays ordinary text under ``Tokenizer``.
# ---------------------------------------------------------------------------------------------------


def _hf_tokenizer_json(tok) -> str:
    """Our tokenizer.json, plus a post-processor that opens a plain text with bos when
    ``add_special_tokens=True`` (transformers' default) for a tokenizer that does so. A chat template
    writes its own opening tokens and ``apply_chat_template`` tokenizes without specials."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    hf = HFTokenizer.from_str(tok.hf.to_str())
    if tok.add_bos:
        bos = tok.chat_config["bos_token"]
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_id)])
    return hf.to_str(pretty=True)


def export_run(run_dir, stage: str, out_dir, peft_dir=None) -> Path:
    """Write ``runs/NAME/<stage>`` as a Hugging Face model directory (GPT-2, Llama or Qwen2 layout). A
    LoRA stage's adapters are merged into the weights, unless ``peft_dir`` is given: then ``out_dir``
    gets the base model and ``peft_dir`` the adapters in PEFT's format (``export_peft_adapter``)."""
    import json

    from safetensors.torch import save_file

    from ..store.files import atomic_write_text
    from ..store.load import load_model
    from ..text.tokenizer import Tokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    stage_dir = Path(stage) if Path(stage).is_dir() and not (run_dir / stage).exists() else run_dir / stage
    model, info = load_model(stage_dir, merge_lora=peft_dir is None)
    if peft_dir is not None and not info.get("lora"):
        raise ValueError(f"{stage_dir}: was not trained with LoRA adapters, so there is no PEFT adapter to write "
                         "(export without --peft)")
    if info.get("kind") == "reward":
        raise ValueError(f"{stage_dir}: is a reward model (a scalar head); only language models export to a "
                         "causal-LM layout")
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    cfg = model.cfg
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{run_dir / 'tokenizer.json'}: {tok.vocab_size} tokens but the model has only "
                         f"{cfg.vocab_size} embeddings")
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.end_id, "pad_token_id": tok.pad_id}
    hf_cfg = {**to_hf_config(cfg), **ids, "torch_dtype": "float32", "use_cache": True}
    atomic_write_text(out_dir / "config.json", json.dumps(hf_cfg, indent=2))
    tmp = out_dir / "model.safetensors.tmp"
    save_file(to_hf_state_dict(model.state_dict(), cfg), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / "model.safetensors")
    atomic_write_text(out_dir / "tokenizer.json", _hf_tokenizer_json(tok))
    chat = tok.chat_config
    named = {chat[k] for k in ("bos_token", "eos_token", "pad_token")}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: chat[k] for k in ("bos_token", "eos_token", "pad_token", "add_bos_token")},
        "additional_special_tokens": [t for t in tok.special if t not in named],
        "model_max_length": cfg.block_size, "clean_up_tokenization_spaces": False,
        "chat_template": chat["chat_template"],
    }
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    atomic_write_text(out_dir / "special_tokens_map.json", json.dumps(
        {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")}, indent=2))
    gen = {**ids, "do_sample": False}
    atomic_write_text(out_dir / "generation_config.json", json.dumps(gen, indent=2))
    if peft_dir is not None:
        export_peft_adapter(model, info["lora"], peft_dir, out_dir)
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


def _hf_chat_config(src: Path, hf_tok) -> dict | None:
    """The source's own chat template and tokens (tokenizer_config.json / chat_template.jinja), or None
    for a model without one. Its pad token must not be its end token (a model trained with pad == end
    never learns to stop), so such a pad is replaced by another special token the tokenizer has."""
    import json

    path = src / "tokenizer_config.json"
    conf = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    template = conf.get("chat_template")
    if (src / "chat_template.jinja").exists():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        return None
    name = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
    eos = name(conf.get("eos_token"))
    if eos is None:
        raise ValueError(f"{path}: a chat template but no eos_token (the end of a turn)")
    bos = name(conf.get("bos_token")) or eos
    # a pad that real text never holds: the model's own, else its unk token, else a special token that is
    # neither the end nor the bos
    specials = [t.content for t in hf_tok.get_added_tokens_decoder().values() if t.special]
    candidates = [name(conf.get("pad_token")), name(conf.get("unk_token"))] + specials
    pad = next((t for t in candidates if t is not None and t not in (eos, bos)), None)
    if pad is None:
        raise ValueError(f"{path}: no special token to pad with apart from the end and bos tokens")
    return {"chat_template": template, "bos_token": bos, "eos_token": eos,
            "pad_token": pad, "add_bos_token": bool(conf.get("add_bos_token", False))}


def save_imported(out_run, stage: str, cfg: GPTConfig, sd: dict, tok, info: dict) -> dict:
    """Write an imported model as a run: ``tokenizer.json`` (+ ``tokenizer_config.json`` with its chat
    template), ``config.yaml`` (its ``model`` section is the imported architecture) and ``<stage>/`` (a
    final checkpoint, no resume state), so ``sft``, ``reward`` and ``ppo`` start from it with ``init_from``."""
    from ..model.gpt import GPT
    from ..store.checkpoint import load_weights, unique_state_dict

    model = GPT(cfg)
    load_weights(model, sd, info.get("source", "imported weights"))
    return write_imported(out_run, stage, cfg, unique_state_dict(model), tok, info, model.num_params())


def write_imported(out_run, stage: str, cfg: GPTConfig, weights: dict, tok, info: dict, params: int) -> dict:
    """The files of an imported run (``save_imported``'s, or a GGUF's kept-quantized weights) -> the import's result."""
    from ..config import Config, save_config
    from ..store.checkpoint import save_checkpoint

    out_run = Path(out_run)
    tok.save(out_run / "tokenizer.json")
    save_config(Config(model=cfg), out_run / "config.yaml")
    info = {"model": cfg.to_dict(), "kind": "imported", "finished": True, "chat_template": tok.chat is not None, **info}
    save_checkpoint(out_run / stage, weights, info, state=None, step=0)
    return {"stage_dir": str(out_run / stage), "vocab_size": cfg.vocab_size, "flavour": cfg.flavour, "params": params,
            **info}


def import_hf(src_dir, out_run, stage: str = "pretrain") -> dict:
    """Bring a local Hugging Face GPT-2, Llama, Mistral, Qwen2 or Qwen3 model and its tokenizer into ``out_run``.

    A chat model (its tokenizer_config.json or chat_template.jinja holds a chat template) keeps its
    template and special tokens, untouched. A model without one gets ours: the chat special tokens it
    lacks are added as *added special tokens* with the next free ids (ids the tokenizer already has
    keep their meaning, so the model's logits on them are unchanged). If that runs past the model's
    embedding table, the table (and an untied LM head) grows to fit; each new row is the mean of the
    existing rows, the usual choice that keeps the new tokens' logits ordinary until fine-tuning
    teaches them — except ``<|bos|>`` and ``<|end|>``, which copy the rows of the model's own
    ``bos_token_id`` and ``eos_token_id`` (config.json) when it has them, so "<|bos|> text" reads as the
    original "bos text" did and the model can already stop. Only byte-level BPE tokenizers (GPT-2,
    Llama 3, Qwen2 style) are accepted: bits-per-byte and streaming decode need each token's exact
    bytes. Mistral's sliding window is not applied: contexts longer than the window differ.
    """
    import json

    from safetensors.torch import load_file
    from tokenizers import AddedToken, decoders

    from ..text.tokenizer import SPECIAL_TOKENS, Tokenizer

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
    if cfg.flavour == "modern" and not cfg.tie_embeddings and "lm_head.weight" not in hf_sd:
        raise ValueError(f"{src}: weights lack lm_head.weight but config.json says the embeddings are not tied")
    try:
        sd = from_hf_state_dict(hf_sd, cfg)
    except KeyError as e:
        raise ValueError(f"{src}: weights lack {e} for a {h.get('model_type')} model of depth {cfg.depth}") from None

    hf_tok = _read_hf_tokenizer(src)
    if not isinstance(hf_tok.decoder, decoders.ByteLevel):
        raise ValueError(f"{src}: tokenizer decoder is {type(hf_tok.decoder).__name__}; only byte-level BPE tokenizers "
                         "are supported")
    hf_tok.post_processor = None  # our code places bos itself
    chat = _hf_chat_config(src, hf_tok)
    missing = []
    if chat is not None:
        tok = Tokenizer(hf_tok, chat)
    else:  # no template of its own: add our chat special tokens it lacks
        missing = [t for t in SPECIAL_TOKENS if hf_tok.token_to_id(t) is None]
        hf_tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        tok = Tokenizer(hf_tok)
    n = max(cfg.vocab_size, tok.vocab_size)
    grow = n - cfg.vocab_size
    # <|bos|> and <|end|> start as copies of the model's own bos / eos rows when it names them, so the
    # imported model reads "<|bos|> text" as it read "bos text" and already knows when to stop
    like = {"<|bos|>": h.get("bos_token_id"), "<|end|>": h.get("eos_token_id")}
    keys = ["tok_emb.weight"] + (["lm_head.weight"] if not cfg.tie_embeddings else [])
    new_ids = {tok.special[t] for t in missing}
    for key in keys:
        w = sd[key]
        if grow:
            w = torch.cat([w, w.mean(0, keepdim=True).expand(grow, -1)], 0)
        mean = w[: cfg.vocab_size].mean(0)
        for t in missing:  # a padding row the checkpoint never trained may hold anything
            src_id = like.get(t)
            ok = isinstance(src_id, int) and 0 <= src_id < min(cfg.vocab_size, len(w)) and src_id not in new_ids
            w[tok.special[t]] = w[src_id].clone() if ok else mean
        sd[key] = w.contiguous()
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    cfg.vocab_size = n
    return save_imported(out_run, stage, cfg, sd, tok, {"source": str(src.resolve()), "added_tokens": missing})


# ---------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format (``chatfactory export --peft DIR``)
#
# ``adapter_config.json`` + ``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained(model,
# DIR)`` loads onto the base model ``export_run`` wrote. Our fused linears split exactly: q, k and v (and
# gate and up) read the same input, so each gets a copy of the fused adapter's A and its own rows of B.
# ---------------------------------------------------------------------------------------------------

def _peft_modules(cfg: GPTConfig, target: str) -> list[tuple[str, slice]]:
    """Our adapted linear -> [(the Hugging Face module under a layer, the rows of B it takes)]."""
    everything = slice(None)
    if cfg.flavour == "gpt2":  # GPT-2 keeps q, k, v fused in c_attn, as we do
        names = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
        return [(names[target], everything)]
    q, kv, f = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.ffn_hidden
    return {"attn.qkv": [("self_attn.q_proj", slice(0, q)), ("self_attn.k_proj", slice(q, q + kv)),
                         ("self_attn.v_proj", slice(q + kv, q + 2 * kv))],
            "attn.proj": [("self_attn.o_proj", everything)],
            "mlp.fc": [("mlp.gate_proj", slice(0, f)), ("mlp.up_proj", slice(f, 2 * f))],
            "mlp.proj": [("mlp.down_proj", everything)]}[target]


def to_peft_state_dict(model) -> tuple[dict, list[str]]:
    """A GPT with LoRA adapters (model/lora.py) -> (PEFT's adapter tensors, its target module names)."""
    from ..model.lora import lora_layers

    layer = "transformer.h" if model.cfg.flavour == "gpt2" else "model.layers"
    out, targets = {}, set()
    for name, m in lora_layers(model).items():
        _, i, target = name.split(".", 2)  # blocks.<i>.attn.qkv
        for module, rows in _peft_modules(model.cfg, target):
            key = f"base_model.model.{layer}.{i}.{module}"
            out[f"{key}.lora_A.weight"] = m.lora_A.detach().clone().contiguous()
            out[f"{key}.lora_B.weight"] = m.lora_B.detach()[rows].clone().contiguous()
            targets.add(module)
    return out, sorted(targets)


def export_peft_adapter(model, lora: dict, adapter_dir, base_dir) -> Path:
    """Write ``model``'s adapters (``lora``: the stage's settings) as a PEFT LoRA adapter for ``base_dir``."""
    import json

    from safetensors.torch import save_file

    from ..store.files import atomic_write_text

    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors, targets = to_peft_state_dict(model)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base_dir).resolve()),
        "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"], "target_modules": targets,
        "bias": "none", "fan_in_fan_out": model.cfg.flavour == "gpt2",  # GPT-2's Conv1D stores weights (in, out)
        "use_rslora": False, "modules_to_save": None, "inference_mode": True,
    }
    atomic_write_text(adapter_dir / "adapter_config.json", json.dumps(config, indent=2))
    tmp = adapter_dir / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, adapter_dir / "adapter_model.safetensors")
    return adapter_dir
