"""Rollout machinery of the RL stages: shared-prompt prefill in the engine, inverse-CDF sampling, and
the grouped forward (one prompt pass per group) that scores and trains on GRPO's rollouts."""
import pytest
import torch

from chatfactory.inference import engine as engine_mod
from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams, sample_probs
from chatfactory.model.gpt import GPT, GPTConfig


@pytest.fixture(scope="module", params=["gpt2", "modern"])
def model(request):
    torch.manual_seed(0)
    gqa = {"n_kv_head": 2} if request.param == "modern" else {}  # grouped-query attention covered too
    return GPT(GPTConfig(flavour=request.param, depth=2, n_embd=64, head_dim=16, vocab_size=97, block_size=64,
                         **gqa)).eval()


def no_sharing(prompts):
    return list(range(len(prompts))), list(range(len(prompts)))


def make_engine(model, static: bool) -> Engine:
    engine = Engine(model)
    if static:  # the static-shape decode step of Engine(compile=True), run uncompiled
        from chatfactory.inference.decode_step import DecodeStep

        engine.compiled = DecodeStep(model, compile=False)
    return engine


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("lengths", [(5, 5), (3, 7)])  # equal lengths (mask-free) and left-padded
def test_shared_prompt_prefill_gives_the_same_tokens_as_copies(model, lengths, static, monkeypatch):
    """Rows repeating a prompt share one prefill; the sampled tokens (seeded, T=1) and greedy tokens are
    exactly those of prefilling every copy on its own (with either decode step)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]
    rows = [x for x in prompts for _ in range(4)]
    for p in (SamplingParams(max_tokens=16, temperature=1.0, seed=5), SamplingParams(max_tokens=16, temperature=0),
              SamplingParams(max_tokens=16, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=2)):
        shared = make_engine(model, static).generate(rows, p)
        with monkeypatch.context() as m:
            m.setattr(engine_mod, "distinct_rows", no_sharing)
            copies = make_engine(model, static).generate(rows, p)
        assert shared == copies  # ids: any host, barring a near tie within round-off (test_engine.py's rule)
    assert len({tuple(x) for x in shared[:4]}) > 1  # the copies did sample different answers


def test_distinct_rows_maps_each_row_to_its_first_occurrence():
    assert engine_mod.distinct_rows([[1], [2], [1], [3], [2]]) == ([0, 1, 3], [0, 1, 0, 2, 1])


def test_inverse_cdf_sampling_matches_the_distribution_and_skips_zero_ids():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    ids = sample_probs(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=6).float() / len(ids)
    assert freq[[0, 2, 5]].sum() == 0
    assert torch.allclose(freq, probs[0], atol=0.015), freq
    edge = sample_probs(torch.tensor([[0.0, 1.0, 0.0]]), None)  # a one-hot row: always its id
    assert edge.tolist() == [1]


@pytest.mark.parametrize("lengths", [(6, 6, 6), (4, 9, 6)])  # equal prompts (causal pass) and left-padded
def test_grouped_forward_equals_the_full_forward_with_gradients(model, lengths):
    """One prompt pass per group gives the logits and the parameter gradients of running every row whole
    (answers of unequal length, so answer padding is covered too)."""
    from chatfactory.train.rollout import attention_mask, forward_answers, pad_batch

    g = torch.Generator().manual_seed(3)
    prompts = [x for n in lengths for x in [torch.randint(3, 97, (n,), generator=g).tolist()] * 4]
    answers = [torch.randint(3, 97, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in prompts]
    batch = pad_batch(prompts, answers, pad_id=0, end_id=1)
    out = {}
    for group in (1, 4):
        model.zero_grad()
        logits = forward_answers(model, {**batch, "group": group})
        (logits.log_softmax(-1)[..., 5] * batch["answer_mask"]).sum().backward()
        out[group] = logits.detach(), [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():  # both equal the plain forward over every column
        h = model.hidden_states(batch["tokens"], positions=batch["positions"], attn_mask=attention_mask(batch["valid"]))
        whole = model.lm_head(h)[:, batch["start"] - 1:-1]
    assert torch.allclose(out[1][0], whole, atol=1e-5)
    assert torch.allclose(out[1][0], out[4][0], atol=1e-5)
    for a, b in zip(out[1][1], out[4][1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_minibatches_keep_the_group_mark_only_for_whole_groups():
    from chatfactory.train.rollout import select

    batch = {"tokens": torch.zeros(8, 3), "group": 4, "start": 1}
    assert select(batch, torch.arange(4, 8))["group"] == 4
    assert select(batch, torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]))["group"] == 4
    for idx in ([2, 3, 4, 5], [0, 1, 3, 2], [0, 1]):
        assert select(batch, torch.tensor(idx))["group"] == 1


def test_grouped_forward_of_one_token_answers(model):
    from chatfactory.train.rollout import forward_answers, pad_batch

    batch = pad_batch([[5, 6, 7]] * 2 + [[8, 9]] * 2, [[3], [4], [1], [3]], pad_id=0, end_id=1)
    with torch.no_grad():
        assert torch.allclose(forward_answers(model, {**batch, "group": 2}), forward_answers(model, batch), atol=1e-5)
