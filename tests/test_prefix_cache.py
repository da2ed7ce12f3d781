"""Automatic prefix caching (inference/prefix_cache.py) and chunked prefill in the scheduler (batching.py):
blocks found only behind the same prefix, LRU eviction under a budget, and a conversation's next turn
answered from cached keys with the logits of a full prefill (fp32 round-off) and the same greedy tokens."""

import pytest
import torch

from chatfactory.inference.batching import BatchOptions, Request, Scheduler
from chatfactory.inference.kv_cache import KVCache
from chatfactory.inference.prefix_cache import PrefixCache
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig

TOL = 1e-4  # log-probs from cached keys vs a full prefill: fp32 round-off of different matmul shapes


def _kv(tokens, a, b):
    """A fake row's keys/values: each position's value is its token id (so a copy can be checked)."""
    t = torch.tensor(tokens[a:b], dtype=torch.float32)
    return t.view(1, 1, 1, -1, 1).expand(2, 2, 1, b - a, 3).clone()


def test_blocks_are_found_only_behind_the_same_prefix():
    pc = PrefixCache(block=4, budget=1 << 20)
    seq = list(range(10, 21))  # 11 tokens: 2 full blocks
    assert pc.store(seq, lambda a, b: _kv(seq, a, b)) == 2 and len(pc) == 2
    n, kv = pc.match(seq + [99], limit=12)
    assert n == 8 and kv.shape == (2, 2, 1, 8, 3) and kv[0, 0, 0, :, 0].tolist() == seq[:8]
    assert pc.match(seq, limit=7)[0] == 4  # a prompt keeps its last token(s) to prefill
    assert pc.match([10, 11, 12, 99] + seq[4:])[0] == 0  # the second block behind another first block: no hit
    assert pc.match([0] + seq)[0] == 0
    assert pc.store(seq + [1, 2, 3, 4, 5], lambda a, b: _kv(seq + [1, 2, 3, 4, 5], a, b)) == 2  # 2 blocks more
    assert pc.match(seq + [1, 2, 3, 4, 5, 6])[0] == 16


def test_least_recently_used_leaves_go_first_under_the_budget():
    one = _kv(list(range(4)), 0, 4)
    size = one.numel() * one.element_size()
    pc = PrefixCache(block=4, budget=3 * size)
    a, b = list(range(100, 112)), list(range(200, 208))
    pc.store(a, lambda x, y: _kv(a, x, y))  # 3 blocks: full
    assert len(pc) == 3 and pc.bytes == 3 * size
    pc.store(b, lambda x, y: _kv(b, x, y))  # 2 more: the deepest of a's chain go, never its first block first
    assert len(pc) == 3 and pc.bytes <= pc.budget and pc.evicted == 2
    assert pc.match(a)[0] == 4 and pc.match(b)[0] == 8
    pc.match(a)  # a's first block now the most recent: b's chain goes leaf first
    pc.store([7] * 8, lambda x, y: _kv([7] * 8, x, y))
    assert pc.match(a)[0] == 4 and pc.match(b)[0] == 0 and pc.match([7] * 8)[0] == 8
    assert PrefixCache(block=4, budget=size - 1).store(a, lambda x, y: _kv(a, x, y)) == 0  # a block > budget


def test_extend_continues_rows_from_their_own_lengths():
    """KVCache.extend + extend_mask: two rows continued from positions 3 and 5 give the logits of a plain
    forward over their whole sequences."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=2, vocab_size=64, block_size=32, n_embd=32, head_dim=16)).eval()
    seqs = [torch.randint(0, 64, (8,)).tolist(), torch.randint(0, 64, (9,)).tolist()]
    cache = KVCache.for_model(model, 2, 32)
    with torch.no_grad():
        for row, n in ((0, 3), (1, 5)):  # each row's prefix, as the prefix cache would have loaded it
            one = KVCache.for_model(model, 1, 32)
            model(torch.tensor([seqs[row][:n]]), cache=one)
            cache.load(row, one.read(0, 0, n))
        rest = [s[n:] for s, n in zip(seqs, (3, 5))]
        T = max(map(len, rest))
        idx = torch.tensor([r + [0] * (T - len(r)) for r in rest])
        cache.extend([0, 1], [3, 5], [len(r) for r in rest])
        pos, mask = KVCache.extend_mask([3, 5], [len(r) for r in rest])
        out = model(idx, cache=cache, positions=pos, attn_mask=mask)
        for row, (s, n) in enumerate(zip(seqs, (3, 5))):
            ref = model(torch.tensor([s]))[0, n:]
            assert torch.allclose(out[row, :len(s) - n], ref, atol=TOL)
    assert cache.lengths == [8, 9]


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(depth=2, vocab_size=97, block_size=128, head_dim=16, n_kv_head=2, n_embd=64,
                         flavour="modern")).eval()


def _ask(sched, prompt, n=12):
    out = []
    sched.submit(Request(prompt, SamplingParams(max_tokens=n, temperature=0.0), out.append, logprobs=3))
    sched.run_until_idle()
    return [s.token for s in out if s.token is not None], [s.top for s in out if s.top is not None]


@pytest.mark.parametrize("chunk", [0, 7])
def test_a_conversations_next_turns_come_from_the_prefix_cache(chunk):
    """Five turns, each prompt the last one + its reply + a new question: from the second turn on the cache
    serves whole blocks of the prompt, and every reply's greedy tokens and top log-probs equal a scheduler's
    without the cache (chunk 7: prefilled 7 tokens a step)."""
    model = _model()
    cached = Scheduler(model, slots=2, start=False, options=BatchOptions(prefix_block=8, prefill_chunk=chunk))
    plain = Scheduler(model, slots=2, start=False, options=BatchOptions(prefix_cache_mb=0, prefill_chunk=chunk))
    assert plain.prefix is None
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 97, (13,), generator=g).tolist()
    for turn in range(5):
        ids, tops = _ask(cached, prompt)
        ref_ids, ref_tops = _ask(plain, prompt)
        assert ids == ref_ids
        for a, b in zip(tops, ref_tops):
            assert [i for i, _ in a] == [i for i, _ in b]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < TOL
        hits = cached.prefix.hit_tokens
        if turn:
            assert hits >= len(prompt) - 20 - 8, (turn, hits, len(prompt))  # all but the new question's blocks
        cached.prefix.hit_tokens = 0
        prompt = prompt + ids + torch.randint(0, 97, (7,), generator=g).tolist()


def test_a_long_prompt_is_prefilled_in_chunks_while_a_reply_decodes():
    """prefill_chunk 8: a 60-token prompt takes 8 steps to prefill, and the running row gets a token at every
    one of them (the long prompt does not stall it); both replies equal an unchunked scheduler's."""
    model = _model(1)
    got = {}
    for chunk in (8, 0):
        sched = Scheduler(model, slots=2, start=False, options=BatchOptions(prefix_cache_mb=0, prefill_chunk=chunk))
        short, long_ = [], []
        sched.submit(Request([5, 6, 7], SamplingParams(max_tokens=30, temperature=0.0), short.append))
        sched.step()
        sched.submit(Request(list(range(1, 61)), SamplingParams(max_tokens=5, temperature=0.0), long_.append))
        first_long = None
        for i in range(40):
            sched.step()
            if long_ and first_long is None:
                first_long = (i, len(short))
        sched.run_until_idle()
        got[chunk] = ([s.token for s in short], [s.token for s in long_], first_long)
    assert got[8][:2] == got[0][:2]
    step, short_tokens = got[8][2]
    assert step == 7 and short_tokens == 9, got[8][2]  # 60 tokens / 8 a step = 8 steps; 1 + 8 short tokens by then
    assert got[0][2] == (0, 2)


def test_options_are_checked():
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        BatchOptions(prefix_cache_mb=-1)
    with pytest.raises(ValueError, match="prefill_chunk"):
        BatchOptions(prefill_chunk=-2)
    with pytest.raises(ValueError, match="block"):
        PrefixCache(block=0)


def test_serve_context_prefix_cache_and_chunks_from_the_command_line(tmp_path):
    """`chatfactory serve --context 64 --prefix-cache-mb 1 --prefill-chunk 8`: the start line names the prefix
    cache, /v1/models gives the slot context as max_model_len, a conversation's second turn is answered (its
    first turn's blocks from the cache), the same greedy reply as with the cache off, and a prompt past the
    context is refused with OpenAI's error."""
    from conftest import make_run, post, serve_subprocess

    run = make_run(tmp_path / "tiny", block=128)
    turn1 = [{"role": "user", "content": "hello world, the quick brown fox"}]
    replies = {}
    for mb in ("1", "0"):
        with serve_subprocess(run, "--context", "64", "--prefix-cache-mb", mb, "--prefill-chunk", "8") as url:
            status, models = post(url, "/v1/models", None)
            assert status == 200 and models["data"][0]["max_model_len"] == 64
            body = {"model": models["data"][0]["id"], "max_tokens": 6, "temperature": 0, "messages": turn1}
            status, r1 = post(url, "/v1/chat/completions", body)
            assert status == 200, r1
            turn2 = turn1 + [r1["choices"][0]["message"], {"role": "user", "content": "and then?"}]
            status, r2 = post(url, "/v1/chat/completions", {**body, "messages": turn2})
            assert status == 200, r2
            replies[mb] = (r1["choices"][0]["message"]["content"], r2["choices"][0]["message"]["content"])
            status, health = post(url, "/health", None)
            on = mb == "1"
            assert (health["prefix_hit_tokens"] >= 16) == on and (health["prefix_cache_mb"] > 0) == on, health
            long_ = [{"role": "user", "content": "fox " * 80}]
            status, err = post(url, "/v1/chat/completions", {**body, "messages": long_})
            assert status == 400 and err["error"]["code"] == "context_length_exceeded", err
    assert replies["1"] == replies["0"]
