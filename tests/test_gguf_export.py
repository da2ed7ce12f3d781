"""`chatfactory export --to FILE.gguf` (formats/gguf_export.py): what it writes reads back, through our own
GGUF import and through transformers' GGUF loader (which implements llama.cpp's layouts independently), to
the run's logits (f16: the weights rounded to f16), tokenizer ids and chat ids; Q8_0 and Q4_0 stay close;
LoRA stages export merged; a tokenizer llama.cpp cannot represent is an error that names it."""
import json

import pytest
import torch

from chatfactory.cli import main as cli_main
from chatfactory.formats.gguf import GGUFError, GGUFFile, import_gguf
from chatfactory.formats.gguf_export import export_gguf, pre_tokenizer_name
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.store.load import load_model
from chatfactory.text.tokenizer import Tokenizer

pytest.importorskip("gguf")

TEXTS = ["Hello world, this is a small test of the tokenizer and the template. " * 3,
         "The quick brown fox jumps over the lazy dog; 12 + 30 = 42. Ünïcödé 世界 🙂"] * 20
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": " the quick fox"}, {"role": "user", "content": "what is 12 + 30?"}]
IDX = torch.tensor([[3, 17, 42, 99, 250, 7, 64, 5]])


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=320)


def _run(root, tok, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(**{"depth": 2, "n_embd": 64, "n_head": 2, "vocab_size": 384, "block_size": 96,
                       "init_std": 0.1, **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(1.0 if "norm" in n and n.endswith("weight") else 0.0, 0.1)  # not the trivial init
    tok.save(root / "tokenizer.json")
    save_checkpoint(root / "sft", unique_state_dict(model), {"model": cfg.to_dict()})
    return model


def _f16(model):
    """The model with every matrix rounded to f16 and back (what an F16 file holds; vectors stay f32)."""
    ref = GPT(model.cfg).eval()
    ref.load_state_dict({k: v.half().float() if v.dim() >= 2 else v for k, v in model.state_dict().items()})
    return ref


@pytest.mark.parametrize("kw", [{"n_kv_head": 1}, {"n_kv_head": 1, "qkv_bias": True, "tie_embeddings": True}],
                         ids=["llama", "qwen2"])
def test_f16_reads_back_as_the_runs_weights_rounded_to_f16(tmp_path, tok, kw):
    model = _run(tmp_path / "run", tok, **kw)
    assert cli_main(["export", "--run", str(tmp_path / "run"), "--to", str(tmp_path / "m.gguf")]) == 0
    g = GGUFFile(tmp_path / "m.gguf")
    arch = "qwen2" if kw.get("qkv_bias") else "llama"
    assert g.meta["general.architecture"] == arch and g.meta["tokenizer.ggml.pre"] == "gpt-2"
    assert g.meta["tokenizer.chat_template"] == tok.chat_config["chat_template"]
    assert g.meta["tokenizer.ggml.eos_token_id"] == tok.end_id and g.meta["tokenizer.ggml.bos_token_id"] == tok.bos_id
    assert len(g.meta["tokenizer.ggml.tokens"]) == model.cfg.vocab_size  # padded with unused tokens to the table
    assert ("output.weight" in g.tensors) == (not kw.get("tie_embeddings"))
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    back, _ = load_model(tmp_path / "back" / "pretrain")
    with torch.no_grad():
        assert (back(IDX) - _f16(model)(IDX)).abs().max().item() < 1e-5
        assert (back(IDX) - model(IDX)).abs().max().item() > 0  # (it is the rounding that is compared)
    tok2 = Tokenizer.load(tmp_path / "back" / "tokenizer.json")
    for text in TEXTS[:2] + ["<|end|> spelled, 世界 🙂 and 12345"]:
        assert tok2.encode(text) == tok.encode(text)
    assert tok2.render_chat(CHAT + [{"role": "assistant", "content": "42"}]) == \
        tok.render_chat(CHAT + [{"role": "assistant", "content": "42"}])  # the file's template renders ours
    assert tok2.chat_prompt(CHAT) == tok.chat_prompt(CHAT) and tok2.end_id == tok.end_id


@pytest.mark.parametrize("flavour", ["modern", "gpt2"])
def test_transformers_gguf_loader_gives_our_logits(tmp_path, tok, flavour):
    """transformers reads llama.cpp's layouts with code of its own (the q/k permutation, gpt2's fused qkv)."""
    transformers = pytest.importorskip("transformers")
    # (gpt2: transformers' GGUF loader sizes the position table at GPT-2's 1,024, whatever the file says)
    model = _run(tmp_path / "run", tok, flavour=flavour, **({"n_kv_head": 1} if flavour == "modern" else
                                                              {"block_size": 1024}))
    r = export_gguf(tmp_path / "run", "sft", tmp_path / "m.gguf", "f16")
    assert r["architecture"] == ("llama" if flavour == "modern" else "gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", torch_dtype=torch.float32)
    with torch.no_grad():
        assert (hf.eval()(IDX).logits - _f16(model)(IDX)).abs().max().item() < 1e-4


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_types_hold_ggmls_own_blocks(tmp_path, tok, qtype):
    """Read back, the weights are exactly what the gguf package's own quantizer and dequantizer make of the run's
    (the embedding and output in Q8_0 for q4_0); the logits move, and by less than the type's usual error."""
    import gguf

    model = _run(tmp_path / "run", tok, n_kv_head=1)
    export_gguf(tmp_path / "run", "sft", tmp_path / "m.gguf", qtype)
    g = GGUFFile(tmp_path / "m.gguf")
    want = {"q8_0": "Q8_0", "q4_0": "Q4_0"}[qtype]
    assert g.tensor_type("blk.0.attn_q.weight") == want and g.tensor_type("blk.0.attn_norm.weight") == "F32"
    assert g.tensor_type("token_embd.weight") == g.tensor_type("output.weight") == "Q8_0" or qtype == "q8_0"
    Q = gguf.GGMLQuantizationType

    def through(name, w):
        kind = Q.Q8_0 if qtype == "q8_0" or name in ("tok_emb.weight", "lm_head.weight") else Q.Q4_0
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind).copy())

    ref = GPT(model.cfg).eval()
    ref.load_state_dict({k: through(k, v) if v.dim() >= 2 else v for k, v in model.state_dict().items()})
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    back, _ = load_model(tmp_path / "back" / "pretrain")
    with torch.no_grad():
        assert (back(IDX) - ref(IDX)).abs().max().item() < 1e-5
        err = (back(IDX) - model(IDX)).abs().max().item() / model(IDX).abs().max().item()
    assert 0 < err < {"q8_0": 0.05, "q4_0": 0.5}[qtype], err


def test_a_lora_stage_exports_merged(tmp_path, tok):
    from chatfactory.model.lora import apply_lora

    model = _run(tmp_path / "run", tok, n_kv_head=1)
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["attn.qkv", "mlp.fc"]}
    apply_lora(model, lora, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora_B"):
                p.normal_(0, 0.3)
    save_checkpoint(tmp_path / "run" / "lora", unique_state_dict(model), {"model": model.cfg.to_dict(), "lora": lora})
    r = export_gguf(tmp_path / "run", "lora", tmp_path / "m.gguf", "f16")
    assert r["lora_merged"]
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    back, _ = load_model(tmp_path / "back" / "pretrain")
    merged, _ = load_model(tmp_path / "run" / "lora")
    with torch.no_grad():
        assert (back(IDX) - _f16(merged)(IDX)).abs().max().item() < 1e-5
        assert (back(IDX) - _f16(load_model(tmp_path / "run" / "sft")[0])(IDX)).abs().max().item() > 1e-3


def test_what_llama_cpp_cannot_hold_is_refused_by_name(tmp_path, tok):
    _run(tmp_path / "run", tok, n_kv_head=1)
    raw = json.loads(tok.hf.to_str())
    raw["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "run" / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(GGUFError, match="pre-tokenizer has no llama.cpp name: .*Whitespace"):
        export_gguf(tmp_path / "run", "sft", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ValueError, match="--type must be one of f16, q8_0, q4_0"):
        export_gguf(tmp_path / "run", "sft", tmp_path / "m.gguf", "q2_k")
    assert pre_tokenizer_name(tok) == "gpt-2"
