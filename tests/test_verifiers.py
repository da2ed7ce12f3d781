"""Verifiers (data/verifiers.py) and the reward an RL stage builds from them (train/rl_models.Reward): the
embedded tasks' correctness, IFEval-type constraints, None where a verifier has no check, and the reward
as the base plus verifier_weight times the verifier, with what the verifier passed in the iteration's log."""
import pytest
import torch

from chatfactory.data.tasks import task_rows
from chatfactory.data.verifiers import VERIFIERS, constraints, constraints_fraction, correct, load_verifier
from chatfactory.train.rl_models import Reward


def test_correct_checks_the_embedded_tasks_and_abstains_on_small_talk():
    rows = {r["task"]: r for r in task_rows("rl", 400, lang="en")}
    arith = rows["arithmetic"]
    assert correct(arith, f"The answer is {arith['answer']}.") == 1.0
    assert correct(arith, f"The answer is {int(arith['answer']) + 1}.") == 0.0
    assert correct(rows["greeting"], "Hello! Nice to meet you.") is None  # style, not a right answer
    harmful = next(r for r in task_rows("rl", 400, lang="en") if r.get("decline"))
    assert correct(harmful, "I'm sorry, but I can't help with that.") == 1.0
    assert correct(harmful, "Sure, here is how.") == 0.0
    assert correct({"messages": [{"role": "user", "content": "hi"}]}, "hello") is None  # not an embedded task


def test_constraints_all_or_nothing_and_fraction():
    row = {"messages": [{"role": "user", "content": "Describe a cat. Use no commas and write in lower case."}],
           "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]}
    assert constraints(row, "a cat is a small furry animal.") == 1.0
    assert constraints(row, "A cat, a small animal.") == 0.0
    # lower case counts only for English text (langdetect): a sentence long enough to be recognised
    assert constraints_fraction(row, "the cat sat on the warm mat, and it was very happy there.") == 0.5
    assert constraints({"messages": row["messages"]}, "anything") is None


def test_load_verifier_by_name_or_scorer_and_errors():
    assert load_verifier("correct") is VERIFIERS["correct"]
    assert load_verifier("chatfactory.data.verifiers:constraints") is constraints
    with pytest.raises(ValueError, match="verifier 'nope': expected one of correct"):
        load_verifier("nope")


def _reward(monkeypatch, texts, **kw):
    r = Reward("zero", None, None, "cpu", **kw)
    monkeypatch.setattr(r, "answer_texts", lambda batch: texts)
    return r


def test_reward_adds_the_weighted_verifier_where_it_checks(monkeypatch):
    rows = {r["task"]: r for r in task_rows("rl", 400, lang="en")}
    picked = [rows["arithmetic"], rows["arithmetic"], rows["greeting"]]
    texts = [f"It is {rows['arithmetic']['answer']}.", "It is 12345.", "Hello there!"]
    batch = {"tokens": torch.zeros(3, 4, dtype=torch.long)}
    r = _reward(monkeypatch, texts, verifier="correct", verifier_weight=0.5)
    assert r(batch, picked).tolist() == [0.5, 0.0, 0.0]  # zero base + 0.5 x (1, 0, no check)
    assert r.last["verified"].item() == pytest.approx(2 / 3) and r.last["verifier"].item() == 0.5
    assert "0.5 x verifier correct" in r.describe()
    plain = _reward(monkeypatch, texts)
    assert plain(batch, picked).tolist() == [0.0, 0.0, 0.0] and plain.last == {}


def test_a_verifier_out_of_range_is_an_error_naming_it(monkeypatch):
    bad = _reward(monkeypatch, ["x"], verifier="chatfactory.data.verifiers:correct")
    monkeypatch.setattr(bad, "verifier", lambda row, text: 2.0)
    with pytest.raises(ValueError, match=r"returned 2.0 \(expected a number in \[0, 1\] or None\)"):
        bad({"tokens": torch.zeros(1, 2, dtype=torch.long)}, [{"messages": [{"role": "user", "content": "q"}]}])
