"""Constrained decoding (inference/grammar.py): a random-init model, whose unconstrained replies are noise,
writes only documents of the grammar when it samples under the mask: in the engine, in the continuous batch
(each row its own grammar, beside unconstrained rows), greedy and sampled; log-probs are the masked
distribution's; a bad schema is refused with the library's reason."""

import json

import jsonschema_rs
import pytest
import torch

from chatfactory.inference.batching import Request, Scheduler
from chatfactory.inference.engine import Engine
from chatfactory.inference.grammar import GrammarError, Grammars, allocate, allowed, mask_logits
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.text.tokenizer import Tokenizer

TEXT = ['{"name": "Ada", "age": 36, "tags": ["a", "b"]} hello world, numbers 0123456789 true false null '
        "the quick brown fox jumps over the lazy dog. " * 3] * 4
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    # the vocabulary padded past the tokenizer's, as an imported model's may be: those ids are never allowed
    return GPT(GPTConfig(depth=1, n_embd=64, head_dim=32, vocab_size=320, block_size=256)).eval()


def _doc(tok, ids):
    return tok.decode([i for i in ids if i != tok.end_id])


def test_bitmask_unpacks_to_the_ids_it_names():
    bm = allocate(2, 70)
    bm[0, 0] = 1 << 3
    bm[1, 2] = 1 << 5  # id 69
    ok = allowed(bm, 70)
    assert ok.sum().item() == 2 and ok[0, 3] and ok[1, 69]
    logits = torch.zeros(2, 80)
    mask_logits(logits, bm)
    assert torch.isfinite(logits).sum().item() == 2 and logits[1, 69] == 0  # ids past the mask are -inf too


def test_engine_writes_schema_valid_json_from_a_random_model(tok, model):
    g = Grammars(tok)
    prompts = [tok.encode("give me json"), tok.encode("hello")]
    free = Engine(model, vocab_limit=tok.vocab_size).generate(prompts, SamplingParams(max_tokens=60, temperature=0))
    with pytest.raises(json.JSONDecodeError):  # unconstrained, the random model writes no JSON
        json.loads(_doc(tok, free[0]))
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
        cons = [g.json_schema(SCHEMA), g.json_schema(None)]
        lps = []
        outs = Engine(model, vocab_limit=tok.vocab_size).generate(
            prompts, SamplingParams(max_tokens=120, temperature=temperature, seed=seed, stop_ids=tok.stop_ids),
            logprobs=lps, constraints=cons)
        assert outs[0][-1] == tok.end_id, "a complete document ends the turn"
        jsonschema_rs.validate(SCHEMA, json.loads(_doc(tok, outs[0])))
        if temperature:  # (greedy, this random model loops inside one endless string of any-JSON: a valid prefix)
            assert outs[1][-1] == tok.end_id and isinstance(json.loads(_doc(tok, outs[1])), dict)
            assert all(c.complete for c in cons)
            # the masked distribution's: once the grammar is complete, the end token is the only choice
            assert lps[0][-1] == pytest.approx(0.0, abs=1e-5) and lps[1][-1] == pytest.approx(0.0, abs=1e-5)


def test_scheduler_rows_each_follow_their_own_grammar(tok, model):
    g = Grammars(tok)
    sched = Scheduler(model, slots=4, start=False, vocab_limit=tok.vocab_size)
    got: dict[int, list] = {i: [] for i in range(4)}
    kinds = [SCHEMA, None, "free", SCHEMA]
    reqs = []
    for i, kind in enumerate(kinds):
        c = None if kind == "free" else g.json_schema(kind)
        p = SamplingParams(max_tokens=120, temperature=1.0, seed=10 + i, stop_ids=tok.stop_ids)
        reqs.append(sched.submit(Request(tok.encode(f"row {i}"), p, emit=got[i].append, logprobs=0, constraint=c)))
    sched.run_until_idle()
    for i, kind in enumerate(kinds):
        steps = got[i]
        assert steps[-1].finish in ("stop", "length")
        ids = [s.token for s in steps if s.token is not None]
        if kind == "free":
            continue
        assert steps[-1].finish == "stop", f"row {i}: {steps[-1].finish} {_doc(tok, ids)!r}"
        doc = json.loads(_doc(tok, ids))
        if kind is not None:
            jsonschema_rs.validate(SCHEMA, doc)
        else:
            assert isinstance(doc, dict)
        assert all(s.logprob is not None and s.logprob <= 0 for s in steps if s.token is not None)


def test_a_schema_the_library_refuses_names_why(tok):
    g = Grammars(tok)
    with pytest.raises(GrammarError, match="objectx"):
        g.json_schema({"type": "objectx"})
    with pytest.raises(GrammarError, match="JSON object"):
        g.json_schema(["not", "a", "schema"])


def test_fork_keeps_state_apart(tok):
    g = Grammars(tok)
    a = g.json_schema(None)
    assert a.accept(tok.encode("{")[0])
    b = a.fork()
    for t in tok.encode('"k": 1}'):
        assert b.accept(t)
    assert b.complete and not a.complete


def test_integers_a_schema_leaves_unbounded_end(tok):
    """A model that writes digits forever cannot: the number ends within I-JSON's range (2**53 has 16 digits)."""
    g = Grammars(tok)
    for schema in ({"type": "integer"}, {"type": "object", "properties": {"n": {"type": "integer"}}}):
        c = g.json_schema(schema)
        prefix = tok.encode('{"n": ' if "properties" in schema else "")
        assert all(c.accept(t) for t in prefix)
        digits = [t for t in tok.encode("5" * 40)]
        taken = c.matcher.try_consume_tokens(digits)
        assert 0 < len(tok.decode(digits[:taken])) <= 16
    bounded = g.json_schema({"type": "integer", "minimum": 3, "maximum": 7})  # a bound the schema gives is kept
    assert not bounded.accept(tok.encode("9")[0])
