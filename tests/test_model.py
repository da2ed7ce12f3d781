"""The GPT matches Hugging Face's GPT-2 and Llama on the same weights; shapes, init and KV cache."""
import math

import pytest
import torch

from chatfactory.formats.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from chatfactory.inference.kv_cache import KVCache
from chatfactory.model.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")


def _ours_from_hf(hf_model):
    cfg = from_hf_config(hf_model.config.to_dict())
    ours = GPT(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf_model.state_dict(), cfg))
    return ours


def test_gpt2_flavour_matches_hf_gpt2_logits():
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=96, n_layer=3, n_head=4,
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = _ours_from_hf(hf)
    idx = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_modern_flavour_matches_hf_llama_logits_with_gqa():
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = _ours_from_hf(hf)
    idx = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("flavour", ["gpt2", "modern"])
def test_export_config_and_weights_load_into_transformers(flavour):
    torch.manual_seed(1)
    cfg = GPTConfig(flavour=flavour, depth=2, vocab_size=300, block_size=32, n_kv_head=1 if flavour == "modern" else 0)
    ours = GPT(cfg).eval()
    hf_cfg = to_hf_config(cfg)
    klass = transformers.GPT2LMHeadModel if flavour == "gpt2" else transformers.LlamaForCausalLM
    conf = (transformers.GPT2Config if flavour == "gpt2" else transformers.LlamaConfig)(**hf_cfg)
    hf = klass(conf).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)
    hf.tie_weights()
    idx = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("flavour", ["gpt2", "modern"])
def test_initial_loss_is_near_ln_vocab(flavour):
    torch.manual_seed(0)
    cfg = GPTConfig(flavour=flavour, depth=2, vocab_size=4096, block_size=64)
    model = GPT(cfg)
    idx = torch.randint(0, 4096, (4, 64))
    loss = model(idx, targets=torch.randint(0, 4096, (4, 64))).item()
    assert abs(loss - math.log(4096)) < 0.1, loss


def test_depth_dial_sets_width_and_heads():
    cfg = GPTConfig(depth=6)
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim) == (384, 6, 64)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(depth=4, n_head=4, n_kv_head=3)


@pytest.mark.parametrize("flavour", ["gpt2", "modern"])
def test_kv_cache_decoding_matches_full_recompute(flavour):
    torch.manual_seed(0)
    cfg = GPTConfig(flavour=flavour, depth=2, vocab_size=100, block_size=32, n_kv_head=1 if flavour == "modern" else 0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, 2, 32)
        pieces = [model(idx[:, :8], cache=cache), model(idx[:, 8:12], cache=cache)]
        pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(12, 20)]
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-5


def test_rope_backward_written_out_gives_autograds_bits():
    """apply_rope's hand-written backward (the rotation by minus the angle) must give exactly what autograd
    gives through the textbook "rotate half" formula, forward and gradient, so training is unchanged."""
    from chatfactory.model.gpt import apply_rope, rope_cos_sin

    torch.manual_seed(0)
    x = torch.randn(3, 17, 6, 32, requires_grad=True)
    cos, sin = (t.unsqueeze(-2) for t in rope_cos_sin(32, torch.arange(17), 10000.0))
    ref = x * cos + torch.cat([-x[..., 16:], x[..., :16]], dim=-1) * sin
    g = torch.randn_like(ref)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    out = apply_rope(x, cos, sin)
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)
    with torch.no_grad():  # inference takes the plain path: the same bits
        assert torch.equal(apply_rope(x, cos, sin), ref)
    # a wrong backward (the rotation by +angle) would differ: the check can fail
    assert not torch.equal(grad, g * cos + torch.cat([-(g * sin)[..., 16:], (g * sin)[..., :16]], dim=-1))
