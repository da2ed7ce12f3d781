"""Hugging Face layouts: convert our GPT's config and weights to and from GPT-2 and Llama checkpoints.

Works on plain dicts and tensors, so the core never needs ``transformers``; tests compare our logits
with ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` built from the converted config.

    hf_cfg = to_hf_config(cfg)                      # dict for transformers' config.json
    hf_sd = to_hf_state_dict(model.state_dict(), cfg)
    sd = from_hf_state_dict(hf_model.state_dict(), from_hf_config(hf_cfg))
"""

from __future__ import annotations

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
