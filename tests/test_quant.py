"""Weight-only int8/int4 quantization (model/quant.py): layers against fp32 and against their own dequantized
reference, a quantized GPT through the engine (eager and decode-step paths), the portable file format
round trip, the ``quantize`` command with ``sample``, and the errors a user can hit."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from chatfactory.cli import main
from chatfactory.inference.decode_step import DecodeStep
from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model import kernels
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.model.quant import (
    QuantLinear,
    linear_bytes,
    pack_nibbles,
    quantize_int4,
    quantize_model,
    set_kernels,
    unpack_nibbles,
)
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.store.files import CheckpointError
from chatfactory.store.load import load_model, save_quantized
from chatfactory.text.tokenizer import Tokenizer
from conftest import TEXT, make_run

CFG = dict(depth=2, n_embd=64, vocab_size=256, block_size=64)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def linear(n_in=128, n_out=96, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    nn.init.normal_(lin.weight, 0, 0.02)
    return lin


@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("bits,group,tol", [(8, 64, 0.01), (4, 32, 0.08), (4, 64, 0.12), (4, 128, 0.14)])
def test_quantized_linear_is_close_to_fp32(bits, group, tol, own):
    """Stated tolerances (relative L2 error of the output, N(0, 0.02) weights): int8 1%, int4 8-14% by group."""
    lin = linear()
    x = torch.randn(5, 7, 128)
    q = QuantLinear.from_linear(lin, bits, group)
    set_kernels(q, own)
    # both fit our kernels (128 inputs: a multiple of 32) and PyTorch's (96 outputs: a multiple of 16)
    assert q.layout == ("own" if own else "cpu")
    with torch.no_grad():
        assert rel_err(q(x), lin(x)) < tol  # 35 rows: the dequantized product
        assert rel_err(q(x[0]), lin(x[0])) < tol  # 7 rows: the integer kernels


def int8_blocks(x):
    """Activations as the own kernels see them: int8 codes per block of 32 columns, scale max |x| / 127."""
    xb = x.reshape(x.size(0), -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).reshape(x.shape)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n_in,n_out,group", [(256, 48, 64), (160, 37, 32), (96, 50, 32), (256, 20, 128)])
def test_own_kernels_compute_the_integer_products_they_state(bits, n_in, n_out, group):
    """The own kernels against the same arithmetic in PyTorch (kernels.cpp's header): activations rounded to
    int8 blocks, the int4 offset times each block's exact sum. Widths with an odd number of blocks (the 512-bit
    path's pairs and a last block alone), output counts that leave remainders, groups of 1, 2 and 4 blocks;
    1-6 and 16 rows (every pass size and a remainder); 17 rows take the exact dequantized product."""
    q = QuantLinear.from_linear(linear(n_in=n_in, n_out=n_out, bias=False), bits, group)
    # the default: ours for int8, for int4 where the 512-bit path is built (else PyTorch's, where it fits)
    wide = kernels.simd_bits() == 512
    assert q.layout == ("own" if bits == 8 or wide else "cpu" if n_out % 16 == 0 else "plain")
    set_kernels(q, True)
    assert q.layout == "own"
    p = q.portable()
    if bits == 8:
        w_codes, lo = p["qweight"].float() * p["scales"][:, None], None
    else:
        codes = unpack_nibbles(p["qweight"]).float().reshape(n_out, -1, group)
        w_codes = (codes * p["scales"].to(torch.bfloat16).float()[..., None]).reshape(n_out, n_in)
        lo = p["offsets"].to(torch.bfloat16).float() - 8 * p["scales"].to(torch.bfloat16).float()
        lo = lo[..., None].expand(n_out, n_in // group, group).reshape(n_out, n_in)
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 5, 6, 16):
            x = torch.randn(rows, n_in)
            want = int8_blocks(x) @ w_codes.T + (0 if lo is None else x @ lo.T)
            torch.testing.assert_close(q(x), want, rtol=1e-4, atol=1e-5)
        x = torch.randn(17, n_in)
        torch.testing.assert_close(q(x), x @ q.dequantized().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_path_agrees_with_the_dequantized_reference(bits, own):
    lin = linear(bias=False)
    q = QuantLinear.from_linear(lin, bits, 64)
    set_kernels(q, own)
    x = torch.randn(9, 128)
    ref = x @ q.dequantized().T
    q.kernel_dtype = torch.float32  # exact products: fp32 round-off
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    q.kernel_dtype = torch.bfloat16  # the fast path: activations in int8 blocks (own) or bfloat16 (PyTorch's)
    assert rel_err(q(x), ref) < (3e-2 if own else 1e-2)


def test_plain_layout_where_no_kernel_fits_dequantizes_on_the_fly():
    lin = linear(n_out=24)  # int4's CPU kernel wants output widths that are multiples of 16
    q = QuantLinear.from_linear(lin, 4, 64)
    set_kernels(q, own=False)
    assert q.layout == "plain"
    x = torch.randn(3, 128)
    torch.testing.assert_close(q(x), x @ q.dequantized().T + lin.bias, rtol=1e-5, atol=1e-6)
    assert rel_err(q(x), lin(x).detach()) < 0.12


@pytest.mark.parametrize("own", [True, False])
def test_int4_codes_survive_the_kernel_layout(own):
    """The saved codes are read back out of each kernel's layout: they must be the codes put in."""
    q = QuantLinear.from_linear(linear(bias=False), 4, 64)
    set_kernels(q, own)
    assert q.layout == ("own" if own else "cpu")
    codes, scales, offsets = quantize_int4(linear(bias=False).weight, 64)
    p = q.portable()
    assert torch.equal(p["qweight"], pack_nibbles(codes))
    assert torch.equal(p["scales"], scales) and torch.equal(p["offsets"], offsets)


@pytest.mark.parametrize("flavour", ["modern", "gpt2"])
@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.15)])
def test_quantized_gpt_logits_are_close_and_it_generates(flavour, bits, tol):
    torch.manual_seed(0)
    model = GPT(GPTConfig(flavour=flavour, **CFG)).eval()
    q = quantize_model(copy.deepcopy(model), bits)
    assert all(not isinstance(m, nn.Linear) for m in q.blocks.modules())
    assert isinstance(q.lm_head, nn.Linear)  # the head stays full precision unless asked
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert rel_err(q(idx), model(idx)) < tol
    prompts = [[5, 6, 7, 8, 9], [3, 4]]  # unequal lengths: left padding, masked decode steps
    p = SamplingParams(max_tokens=10, temperature=0)
    eager = Engine(q).generate(prompts, p)
    assert all(len(o) == 10 for o in eager)
    # Engine(compile=True) takes the compiled decode step of inference/decode_step.py, the layers' kernels called
    # inside the graph: the same ids
    assert Engine(q, compile=True).generate(prompts, p) == eager
    one = Engine(q).generate([prompts[0]], p)
    assert Engine(q, compile=True).generate([prompts[0]], p) == one and DecodeStep(q, compile=False).quantized


def test_include_head_quantizes_the_lm_head_and_shrinks_the_weights():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    full = linear_bytes(model)
    q8 = quantize_model(copy.deepcopy(model), 8, include_head=True)
    q4 = quantize_model(copy.deepcopy(model), 4, include_head=True)
    assert isinstance(q4.lm_head, QuantLinear)
    assert linear_bytes(q8) < full / 3.5 and linear_bytes(q4) < full / 6


@pytest.mark.parametrize("bits", [8, 4])
def test_save_load_round_trip_gives_identical_logits(tmp_path, bits):
    torch.manual_seed(0)
    q = quantize_model(GPT(GPTConfig(flavour="gpt2", **CFG)), bits, include_head=True)
    save_quantized(q, tmp_path / "s", {"stage": "sft", "finished": True})
    back, info = load_model(tmp_path / "s", inference=True)
    assert info["quantized"] == {"scheme": f"int{bits}", "bits": bits, "group": 32 if bits == 4 else None,
                                    "include_head": True}
    idx = torch.randint(0, 256, (2, 9))
    with torch.no_grad():  # bitwise on any host: the same codes in the same layout, the same kernels on the same shapes
        assert torch.equal(back(idx), q(idx))
    raw = load_file(str(tmp_path / "s" / "model.safetensors"))  # raw codes, not a kernel's layout
    w = raw["blocks.0.mlp.fc.qweight"]
    assert w.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert tuple(w.shape) == (q.cfg.ffn_hidden, 64 if bits == 8 else 32)  # gpt2's MLP: 4 * 64 outputs


def test_quantized_stage_is_refused_by_training_and_loaded_by_inference(tmp_path):
    torch.manual_seed(0)
    q = quantize_model(GPT(GPTConfig(**CFG)), 4)
    save_quantized(q, tmp_path / "sft-int4", {"stage": "sft", "quantized_from": "sft"})
    with pytest.raises(CheckpointError, match="quantized stage .*int4.*inference only.*from \\(sft\\)"):
        load_model(tmp_path / "sft-int4")  # what every trainer calls
    model, _ = load_model(tmp_path / "sft-int4", inference=True)
    assert isinstance(model.blocks[0].attn.qkv, QuantLinear)
    with pytest.raises(ValueError, match="int4 stage already.*--quantize int8 cannot"):
        load_model(tmp_path / "sft-int4", inference=True, quantize="int8")
    with pytest.raises(ValueError, match="quantize= and max_memory= load a model for inference"):
        load_model(tmp_path / "sft-int4", quantize="int4")  # a trainer asking for integer weights
    # an imported GGUF's stage names its source formats under "quantization" (weights fp32): it trains
    cfg = GPTConfig(**CFG)
    save_checkpoint(tmp_path / "imported", unique_state_dict(GPT(cfg)),
                    {"model": cfg.to_dict(), "quantization": ["Q4_1"]})
    assert isinstance(load_model(tmp_path / "imported")[0].blocks[0].attn.qkv, nn.Linear)


def test_bad_schemes_are_named():
    model = GPT(GPTConfig(**CFG))
    with pytest.raises(ValueError, match="only int8.*and int4"):
        quantize_model(model, 3)
    with pytest.raises(ValueError, match="--group 48: int4 groups of 32, 64, 128, 256"):
        quantize_model(model, 4, group=48)
    with pytest.raises(ValueError, match="--group 128 does not divide the input width 64 of blocks.0.attn.qkv"):
        quantize_model(model, 4, group=128)
    quantize_model(model, 8)
    with pytest.raises(ValueError, match="quantized already \\(int8\\)"):
        quantize_model(model, 4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """conftest's tiny run: a tokenizer and a random GPT as the 'sft' stage (its vocabulary padded past
    the tokenizer's, as an imported model's may be)."""
    root = make_run(tmp_path_factory.mktemp("quantrun"), block=64)
    return root, Tokenizer.load(root / "tokenizer.json")


def sample_text(capsys, *args):
    assert main(["sample", *map(str, args), "--temperature", "0", "--max-tokens", "12", "--prompt", "the cat"]) == 0
    assert torch.is_grad_enabled()  # the command leaves the caller's grad mode alone (it once turned it off for good)
    return capsys.readouterr().out


def test_cli_quantize_then_sample(run, capsys):
    root, tok = run
    assert main(["quantize", "--run", str(root), "--stage", "sft", "--bits", "4"]) == 0
    assert "sft-int4" in capsys.readouterr().out
    info = json.loads((root / "sft-int4" / "config.json").read_text())
    assert info["quantized"]["scheme"] == "int4" and info["quantized_from"] == "sft"
    out = sample_text(capsys, "--run", root, "--stage", "sft-int4")
    model, _ = load_model(root / "sft-int4", inference=True)
    ids = Engine(model, vocab_limit=tok.vocab_size).generate([tok.document("the cat")], SamplingParams(
        max_tokens=12, temperature=0, stop_ids=tok.stop_ids))[0]
    ids = [t for t in ids if t not in tok.stop_ids]
    assert out == "the cat" + tok.decode(ids) + "\n"
    # quantize on load: the same codes as the quantized stage, so the same text
    assert sample_text(capsys, "--run", root, "--stage", "sft", "--quantize", "int4") == out
    assert sample_text(capsys, "--run", root, "--stage", "sft", "--quantize", "int8").startswith("the cat")
    for stage in (["--stage", "sft-int4"], ["--stage", "sft", "--quantize", "int8"]):
        assert main(["chat", "--run", str(root), *stage, "--prompt", "hello", "--temperature", "0",
                     "--max-tokens", "5"]) == 0
    assert main(["chat", "--run", str(root), "--stage", "sft-int4", "--quantize", "int8", "--prompt", "hi"]) == 2
    assert "int4 stage already (groups of 32): --quantize int8 cannot requantize it" in capsys.readouterr().err
    assert main(["sample", "--run", str(root), "--stage", "sft", "--quantize", "int8:32"]) == 2
    assert "--quantize int8:32: a group size goes with int4 only, one of 32, 64, 128, 256" in capsys.readouterr().err
    # int4 with groups of 64 on load: the codes `quantize --group 64` would write
    assert main(["quantize", "--run", str(root), "--stage", "sft", "--bits", "4", "--group", "64",
                 "--out-stage", "g64"]) == 0
    capsys.readouterr()
    assert sample_text(capsys, "--run", root, "--stage", "sft", "--quantize", "int4:64") == \
        sample_text(capsys, "--run", root, "--stage", "g64")


@pytest.mark.parametrize("args,message", [
    (["--bits", "3"], "--bits 3: only 8 (int8, per output channel) and 4 (int4, group-wise)"),
    (["--bits", "4", "--group", "128"], "--group 128 does not divide the input width 64"),
    (["--bits", "4", "--stage", "nope"], "--stage='nope': no trained weights"),
])
def test_cli_quantize_errors(run, capsys, args, message):
    root, _ = run
    argv = ["quantize", "--run", str(root), "--stage", "sft", *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_and_serve_load_quantized_weights(run, tmp_path, capsys):
    """``eval`` scores a quantized stage and quantizes on load (bits/byte near fp32's); ``serve``'s loader
    builds a quantized stage's model (it loads for inference) and quantizes on load when asked."""
    from chatfactory.serve.service import load_service
    from chatfactory.store.load import quantize_stage

    root, _ = run
    quantize_stage(root, "sft", 4, out_stage="sft-q4-eval")
    text = tmp_path / "heldout.txt"
    text.write_text(TEXT[0][:600])

    def bpb(*args):
        out = tmp_path / "r.json"
        assert main(["eval", "--run", str(root), "--text", str(text), "--json", str(out), *args]) == 0
        return json.loads(out.read_text())["text"][str(text)]["bpb"]

    full = bpb("--stage", "sft")
    assert abs(bpb("--stage", "sft", "--quantize", "int8") / full - 1) < 0.01
    assert abs(bpb("--stage", "sft-q4-eval") / full - 1) < 0.05
    capsys.readouterr()
    svc = load_service(root, "sft-q4-eval", device="cpu")
    assert isinstance(svc.model.blocks[0].mlp.fc, QuantLinear)
    assert svc.precision == "int4 (groups of 32)"  # what /v1/models says (tests/test_serve.py checks the route)
    svc.close()
    svc = load_service(root, "sft", device="cpu", quantize="int8")
    assert svc.precision == "int8"
    svc.close()


def test_lazy_weights_read_one_tensor_at_a_time_from_the_save_they_opened(tmp_path):
    """What the quantized loaders read through (checkpoint.LazyWeights): each tensor as it is taken, equal to
    the saved one; a save that renames a new file over the old one meanwhile changes nothing read after it
    (one descriptor on the file opened and checked): never a mix of two saves."""
    from chatfactory.store.checkpoint import load_checkpoint

    torch.manual_seed(0)
    q = quantize_model(GPT(GPTConfig(**CFG)), 4)
    save_quantized(q, tmp_path / "s", {"stage": "sft"})
    w, info, _ = load_checkpoint(tmp_path / "s", lazy=True)
    full = load_file(str(tmp_path / "s" / "model.safetensors"))
    assert set(w) == set(full) and info["quantized"]["group"] == 32
    assert torch.equal(w.pop("blocks.0.attn.qkv.qweight"), full["blocks.0.attn.qkv.qweight"])
    assert "blocks.0.attn.qkv.qweight" not in w and len(w) == len(full) - 1
    torch.manual_seed(1)
    save_quantized(quantize_model(GPT(GPTConfig(**CFG)), 4), tmp_path / "s", {"stage": "sft"})  # another save
    renamed = load_file(str(tmp_path / "s" / "model.safetensors"))
    assert not torch.equal(renamed["blocks.0.attn.qkv.scales"], full["blocks.0.attn.qkv.scales"])
    assert all(torch.equal(w[k], full[k]) for k in w)  # still the first save's, every one
