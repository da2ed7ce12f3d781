"""The inference engine: batched generation with mixed prompt lengths, sampling controls, stops."""
import pytest
import torch

from chatfactory.engine import Engine, SamplingParams
from chatfactory.model import GPT, GPTConfig


@pytest.fixture(scope="module", params=["gpt2", "modern"])
def engine(request):
    torch.manual_seed(0)
    return Engine(GPT(GPTConfig(flavour=request.param, depth=2, vocab_size=97, block_size=64)))


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
