"""A small random transformers model (Llama or Qwen2) written as a GGUF file the way llama.cpp's converter
writes it, with a byte-level BPE vocabulary and a ChatML template (tests/test_gguf.py, tests/test_pipeline.py).
Needs the ``gguf`` and ``transformers`` packages: a caller skips without them (pytest.importorskip) first."""
import json
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers

Q = gguf.GGMLQuantizationType

CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["The quick brown fox jumps over the lazy dog. 12345 + 678", "北京是中国的首都。 🙂 emoji",
         "def f(x):\n    return x ** 2\n"] * 30


def _bpe_vocab():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(t.to_str())["model"]
    tokens = [tok for tok, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_gguf(path: Path, arch: str, types: dict) -> "torch.nn.Module":
    """A random transformers model of ``arch`` (llama | qwen2) written as GGUF the way llama.cpp's
    converter writes it (Llama's q/k rows permuted); returns the model."""
    tokens, merges = _bpe_vocab()
    V, D, F, L, H, KV = len(tokens), 64, 128, 2, 4, 2
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                                       num_attention_heads=H, num_key_value_heads=KV, rope_theta=50000.0,
                                       tie_word_embeddings=True, rms_norm_eps=1e-5)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                                       num_attention_heads=H, num_key_value_heads=KV, rope_theta=50000.0,
                                       tie_word_embeddings=False, rms_norm_eps=1e-5)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # q/k/v biases start at zero: make them count
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.5)
    model.eval()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(50000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|im_end|>"))  # pad = eos, as SmolLM2's file says: we must pick another
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def permute(x, heads):
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def add(name, x, i=0):
        kind = types.get(name.split(".")[-2], "F32") if x.ndim == 2 else "F32"
        kind = [kind] if isinstance(kind, str) else kind
        kind = kind[i % len(kind)]
        if kind == "F32":
            w.add_tensor(name, x)
        elif kind == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, Q[kind]), raw_dtype=Q[kind])

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if arch == "qwen2":
        add("output.weight", sd["lm_head.weight"])
    for i in range(L):
        for theirs, ours in names.items():
            x = sd[f"model.layers.{i}.{theirs}.weight"]
            if arch == "llama" and ours in ("attn_q", "attn_k"):
                x = permute(x, H if ours == "attn_q" else KV)
            add(f"blk.{i}.{ours}.weight", x, i)
            if f"model.layers.{i}.{theirs}.bias" in sd:
                add(f"blk.{i}.{ours}.bias", sd[f"model.layers.{i}.{theirs}.bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model
