"""The inference engine: batched generation with mixed prompt lengths, sampling controls, stops.

Where two ways of decoding are compared (a batch and its rows alone, the static or packed step and the eager one,
ours and transformers'), the logits are not the same floats (other shapes, other kernels), so the tests compare
token ids: equal on any host wherever no step's top two logits (or, sampling, a draw and the boundary between two
tokens) lie within fp32 round-off of each other, which random tiny models make improbable. Floats are compared
within a stated tolerance (the KV cache against a full recompute)."""
import pytest
import torch

from chatfactory.inference.decode_step import DecodeStep
from chatfactory.inference.engine import Engine
from chatfactory.inference.kv_cache import KVCache
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig


@pytest.fixture(scope="module",
                params=["gpt2", "modern", "gpt2-static", "modern-static", "gpt2-packed", "modern-packed"])
def engine(request):
    """Each flavour three times: the eager decode step, the static-shape step of Engine(compile=True)
    run uncompiled (same code as compiled, none of the compile time), and the step on oneDNN-packed
    weights that Engine(compile=True) takes for batches of 3+ rows of wide models, so every test
    below covers all three."""
    flavour = request.param.split("-")[0]
    torch.manual_seed(0)
    # grouped-query attention in the modern flavour: the static step handles head groups itself
    cfg = dict(n_embd=128, head_dim=32, n_kv_head=2) if flavour == "modern" else {}
    engine = Engine(GPT(GPTConfig(flavour=flavour, depth=2, vocab_size=97, block_size=64, **cfg)))
    if not request.param.endswith(("gpt2", "modern")):
        engine.compiled = DecodeStep(engine.model, compile=False)
        engine.compiled.packed_min_width = 0 if request.param.endswith("packed") else 10**9
    return engine


def test_batched_greedy_equals_one_by_one(engine):
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    p = SamplingParams(max_tokens=12, temperature=0)
    batched = engine.generate(prompts, p)
    assert batched == [engine.generate([x], p)[0] for x in prompts]
    assert all(len(o) == 12 for o in batched)


def test_seeded_sampling_is_reproducible_and_stops(engine):
    p = SamplingParams(max_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    a, b = engine.generate([[1, 2]], p), engine.generate([[1, 2]], p)
    assert a == b
    stop = a[0][4]
    out = engine.generate([[1, 2]], SamplingParams(**{**p.__dict__, "stop_ids": (stop,)}))[0]
    assert out[-1] == stop and len(out) == a[0].index(stop) + 1


def test_context_limit_is_enforced(engine):
    with pytest.raises(ValueError, match="context"):
        engine.generate([[1] * 64], SamplingParams(max_tokens=1))
    assert len(engine.generate([[1] * 60], SamplingParams(max_tokens=50, temperature=0))[0]) == 4


def test_kv_cache_decoding_equals_full_recompute_at_every_step(engine):
    """Logits of every decode step (from the cache) match a fresh forward over the whole sequence."""
    model = engine.model
    torch.manual_seed(1)
    for prompt_len in (1, 7):
        seq = torch.randint(0, 97, (2, prompt_len))
        cache = KVCache.for_model(model, 2, 40)
        with torch.no_grad():
            step_logits = model(seq, cache=cache)[:, -1]
            for _ in range(12):
                full = model(seq)[:, -1]
                assert torch.allclose(step_logits, full, atol=1e-5), (step_logits - full).abs().max()
                nxt = step_logits.argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
                step_logits = model(nxt, cache=cache)[:, -1]


def test_padded_batch_logits_equal_unpadded(engine):
    """A left-padded row gets the same greedy tokens and the same per-step argmax margins as alone,
    with repetition penalty on (the penalty must ignore pads)."""
    p = SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3)
    prompts = [[3, 4, 5, 6, 7, 8], [9]]
    assert engine.generate(prompts, p) == [engine.generate([x], p)[0] for x in prompts]


def test_stop_ids_end_rows_independently(engine):
    p = SamplingParams(max_tokens=15, temperature=0)
    free = engine.generate([[5, 6, 7], [42]], p)
    k = next((k for k in range(1, 15) if free[0][k] not in free[0][:k]), 0)  # a token first seen at step k
    stop = free[0][k]
    stopped = engine.generate([[5, 6, 7], [42]], SamplingParams(max_tokens=15, temperature=0, stop_ids=(stop,)))
    assert stopped[0] == free[0][: k + 1]
    cut = free[1].index(stop) + 1 if stop in free[1] else 15
    assert stopped[1] == free[1][:cut]


def test_engine_restores_callers_thread_count(engine):
    before = torch.get_num_threads()
    seen = []
    engine.threads = {1: 1}
    try:
        for _ in engine.stream([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0)):
            seen.append(torch.get_num_threads())
    finally:
        engine.threads = {}
    assert seen == [before] * 3 and torch.get_num_threads() == before


def test_gpt2_greedy_equals_transformers_generate():
    transformers = pytest.importorskip("transformers")
    from chatfactory.formats.hf import to_hf_config, to_hf_state_dict

    torch.manual_seed(0)
    cfg = GPTConfig(flavour="gpt2", depth=2, n_embd=64, vocab_size=300, block_size=64)
    ours = GPT(cfg)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**to_hf_config(cfg))).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    prompt = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, min_new_tokens=30,
                             do_sample=False, use_cache=True, pad_token_id=0)[0, 9:].tolist()
    assert Engine(ours).generate(prompt.tolist(), SamplingParams(max_tokens=30, temperature=0))[0] == theirs


def test_fit_messages_drops_oldest_turns_and_keeps_system():
    from chatfactory.inference.engine import fit_messages

    def count(msgs):  # 1 token per character plus 2 per message: a stand-in tokenizer
        return sum(len(m["content"]) + 2 for m in msgs)

    sys_msg = {"role": "system", "content": "sys"}
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    conv = [sys_msg] + turns + [{"role": "user", "content": "last"}]
    kept, dropped = fit_messages(conv, count, budget=10_000)
    assert kept == conv and dropped == 0
    kept, dropped = fit_messages(conv, count, budget=count(conv) - 1)
    assert kept == [sys_msg] + turns[2:] + [conv[-1]] and dropped == 2  # a whole turn: user + assistant
    assert count(kept) <= count(conv) - 1
    kept, dropped = fit_messages(conv, count, budget=count([sys_msg, conv[-1]]))
    assert kept == [sys_msg, conv[-1]] and dropped == 8
    with pytest.raises(ValueError, match="shorten"):
        fit_messages(conv, count, budget=count([sys_msg, conv[-1]]) - 1)


def test_compiled_decode_equals_eager_greedy():
    """Engine(compile=True) really compiles (no fallback warning) and gives the eager engine's greedy
    tokens, for a single prompt (the compiled multiply-sum step) and a padded batch of 5 (the compiled
    step with BLAS products; rotary positions from the table looked up outside the graph)."""
    import warnings

    torch.manual_seed(0)
    model = GPT(GPTConfig(flavour="modern", depth=1, n_embd=64, head_dim=32, vocab_size=97, block_size=48))
    eager = Engine(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Engine.compile=True.")  # a fallback would warn: fail instead
        compiled = Engine(model, compile=True)
        p = SamplingParams(max_tokens=20, temperature=0)
        for prompts in ([[5, 6, 7]], [[1, 2], [3, 4, 5, 6, 7], [8], [9, 10, 11], [12, 13, 14, 15]]):
            assert compiled.generate(prompts, p) == eager.generate(prompts, p)


def test_fast_step_follows_weight_changes():
    """The fast step reads the weights as they are now: after an in-place update (an optimizer step)
    its tokens follow the eager engine's, for the multiply-sum (1 row), BLAS (3 rows; 1 row of a model
    taken for a big one) and packed (3 rows) forms."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(flavour="modern", depth=1, n_embd=64, head_dim=32, vocab_size=97, block_size=48))
    eager = Engine(model)
    p = SamplingParams(max_tokens=10, temperature=0)
    cases = (([[5, 6, 7]], 0, None), ([[5, 6, 7]], 0, 0), ([[1, 2], [3, 4, 5], [6]], 10**9, None),
             ([[1, 2], [3, 4, 5], [6]], 0, None))
    for prompts, packed_min_width, streamed_min_bytes in cases:
        fast = Engine(model)
        fast.compiled = DecodeStep(model, compile=False)
        fast.compiled.packed_min_width = packed_min_width
        if streamed_min_bytes is not None:
            fast.compiled.streamed_min_bytes = streamed_min_bytes
        before = fast.generate(prompts, p)
        assert before == eager.generate(prompts, p)
        with torch.no_grad():
            for w in model.parameters():
                w.add_(torch.randn_like(w) * 0.5)
        after = fast.generate(prompts, p)
        assert after == eager.generate(prompts, p) and after != before


def test_compiled_span_holds_prompt_and_answer():
    """Above 2 rows the compiled step's key/value buffers span the power of two (>= 32) holding prompt
    + answer, capped by the context; 1-2 rows span the whole context (one graph per batch size), except
    for a model too big for the cache (a whole-context span there reads hundreds of MB per step)."""
    from chatfactory.inference.decode_step import span_for

    assert [span_for(32, n, 128) for n in (1, 32, 33, 46, 64, 65, 128)] == [32, 32, 64, 64, 64, 128, 128]
    assert span_for(32, 100, 96) == 96 and span_for(2, 10, 128) == 128 and span_for(1, 10, 64) == 64
    assert span_for(1, 10, 8192, streamed=True) == 32 and span_for(2, 300, 8192, streamed=True) == 512


def test_failed_compile_warns_once_and_decodes_eagerly():
    torch.manual_seed(0)
    model = GPT(GPTConfig(flavour="gpt2", depth=1, n_embd=64, vocab_size=97, block_size=48))
    fast = Engine(model)
    fast.compiled = DecodeStep(model, compile=False)

    def broken(*args):
        raise RuntimeError("no C++ compiler found\nmore detail")

    fast.compiled.fn = broken
    p = SamplingParams(max_tokens=8, temperature=0)
    with pytest.warns(RuntimeWarning,
                      match="torch.compile failed .RuntimeError: no C.. compiler found.; decoding eagerly"):
        out = fast.generate([[5, 6, 7]], p)
    assert out == Engine(model).generate([[5, 6, 7]], p) and fast.compiled is None
