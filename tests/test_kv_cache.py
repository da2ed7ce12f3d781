"""The KV cache's interface (inference/kv_cache.py), as its callers use it: what a paged cache must keep."""
import pytest
import torch

from chatfactory.inference.kv_cache import GradKVCache, KVCache
from chatfactory.model.gpt import GPT, GPTConfig

CFG = GPTConfig(depth=2, n_embd=64, head_dim=16, n_kv_head=2, vocab_size=50, block_size=32)


def kv(rows: int, t: int, fill: float) -> torch.Tensor:
    return torch.full((rows, CFG.n_kv_head, t, CFG.head_dim), fill)


def test_unplanned_forwards_append_to_every_row_and_overflow_is_refused():
    cache = KVCache(CFG, rows=2, capacity=4)
    assert cache.start(3) == 0 and cache.length == 3
    k, v = cache.append(0, kv(2, 3, 1.0), kv(2, 3, 2.0))
    assert k.shape[2] == 3 and bool((k == 1).all() and (v == 2).all())
    assert cache.start(1) == 3
    k, _ = cache.append(0, kv(2, 1, 5.0), kv(2, 1, 5.0))
    assert k.shape[2] == 4 and k[:, :, :3].eq(1).all() and k[:, :, 3].eq(5).all()
    with pytest.raises(ValueError, match="overflow"):
        cache.start(1)


def test_slots_prefill_decode_and_free_independently():
    cache = KVCache(CFG, rows=3, capacity=8)
    cache.prefill([2, 0], [3, 1])  # right-padded to width 3: slot 0 keeps 1 position
    assert cache.start(3) == 0
    cache.append(0, kv(2, 3, 1.0), kv(2, 3, 1.0))
    assert cache.lengths == [1, 0, 3]
    at = cache.decode([0, 2])  # slot 1 is free: it rides along, does not grow
    assert at.tolist() == [1, 0, 3] and cache.start(1) is None
    k, _ = cache.append(0, torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 1, 16), kv(3, 1, 0.0))
    assert k.shape[:3] == (3, 2, 4) and cache.lengths == [2, 0, 4]
    assert k[0, :, 1].eq(0).all() and k[2, :, 3].eq(2).all() and k[2, :, :3].eq(1).all()
    cache.free(2)
    assert cache.lengths == [2, 0, 0]
    with pytest.raises(ValueError, match="different lengths"):
        cache.start(1)  # unplanned, rows at different lengths


def test_fork_views_and_decode_buffers():
    cache = KVCache(CFG, rows=2, capacity=6)
    cache.start(2)
    for layer in range(CFG.depth):
        cache.append(layer, torch.stack([kv(1, 2, 1.0)[0], kv(1, 2, 2.0)[0]]), kv(2, 2, 0.0))
    cache.fork([1, 0, 1])  # row i continues row [1, 0, 1][i]
    assert cache.num_rows == 3 and cache.lengths == [2, 2, 2]
    ks, _ = cache.buffers(4)  # copies of a fixed span
    assert ks[0].shape == (3, 2, 4, 16) and ks[0][:, 0, 0, 0].tolist() == [2.0, 1.0, 2.0]
    assert ks[0][:, :, 2:].eq(0).all()
    ks[0].fill_(9)
    own, _ = cache.buffers()  # the cache's own: a step's writes land in it
    assert own[0].shape[2] == 6 and own[0][:, :, :2].ne(9).all()
    cache.start(1)
    assert cache.viewable
    cache.view(slice(1, 3)).append(1, kv(2, 1, 7.0), kv(2, 1, 7.0))
    assert own[1][1:, :, 2].eq(7).all() and own[1][0, :, 2].eq(0).all()


def test_grad_cache_shares_a_prompt_pass_with_gradients_flowing():
    torch.manual_seed(0)
    model = GPT(CFG)
    prompt, answers = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (3, 4))
    full = model(torch.cat([prompt.expand(3, 5), answers], 1))[:, 5:]
    cache = GradKVCache(rows=1)
    model(prompt, cache=cache)
    cache.fork([0, 0, 0])
    assert not cache.viewable
    shared = model(answers, cache=cache, positions=torch.arange(5, 9))
    assert torch.allclose(shared, full, atol=1e-5)
    (g_shared,) = torch.autograd.grad(shared.square().sum(), model.tok_emb.weight)
    (g_full,) = torch.autograd.grad(full.square().sum(), model.tok_emb.weight)
    assert torch.allclose(g_shared, g_full, atol=1e-5)
