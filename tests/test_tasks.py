"""The embedded default's tasks (data/tasks.py): disjoint splits, determinism, and the rubric's judgements."""

import json

import pytest

from chatfactory.data import tasks as T
from chatfactory.tokenizer import check_messages


def test_rows_are_deterministic_and_well_formed():
    a, b = T.all_rows(), T.all_rows()
    assert a == b and len(a) > 3000
    for r in a:
        check_messages(r["messages"])
        assert r["messages"][-1]["role"] == "user"
        assert r["task"] and r["reference"] and r["answer"]
    assert T.task_rows("rl", 50, seed=1) == T.task_rows("rl", 50, seed=1)
    assert T.task_rows("rl", 50, seed=1) != T.task_rows("rl", 50, seed=2)
    with pytest.raises(ValueError, match="unknown task split 'train'"):
        T.task_rows("train")


def test_every_family_has_several_phrasings():
    rows = T.all_rows()
    tasks = {r["task"] for r in rows}
    assert {"arithmetic", "string_reverse", "string_upper", "string_count", "compare", "sort", "python_fact",
            "greeting", "recall_name", "decline"} <= tasks
    # the same arithmetic question asked in more than one way
    asks = {r["messages"][-1]["content"] for r in rows if r["task"] == "arithmetic" and r["reference"] == "3 + 4 = 7."}
    assert len(asks) >= 4
    assert any(len(r["messages"]) == 3 for r in rows)  # multi-turn small talk
    # facts come from this Python's own docstrings
    assert T.builtin_facts()["len"] == "Return the number of items in a container."


def test_splits_are_disjoint_and_heldout_never_reaches_training():
    texts = {s: {T.prompt_text(r) for r in T.task_rows(s)} for s in T.SPLITS}
    assert not (texts["heldout"] & texts["sft"]) and not (texts["heldout"] & texts["rl"]) and not (texts["sft"] & texts["rl"])
    assert len(texts["heldout"]) >= 400
    heldout = T.task_rows("heldout", 200)
    assert len({r["task"] for r in heldout}) >= 10  # round-robin: a small n still covers the tasks
    pretrain = "\n".join(T.pretrain_texts())
    assert sum(T.plain_prompt(r) in pretrain for r in T.task_rows("sft", 100)) > 90
    assert not any(T.plain_prompt(r) + " " in pretrain for r in T.task_rows("heldout"))


def test_rubric_prefers_right_concise_clean_and_declines():
    rows = {r["task"]: r for r in T.task_rows("heldout")}
    for task, r in rows.items():
        assert T.rubric_score(r, r["reference"]) == 1.0, task
        assert T.is_correct(r, r["reference"] + "<|end|>garbage"), task
    ar = next(r for r in T.all_rows() if r["reference"] == "3 + 4 = 7.")
    right, wrong = T.rubric_score(ar, "3 + 4 = 7."), T.rubric_score(ar, "3 + 4 = 8.")
    ramble = T.rubric_score(ar, "3 + 4 = 7. " + " ".join(f"And {i} more things to say." for i in range(10)))
    loop = T.rubric_score(ar, "The answer is 7. The answer is 7.")
    assert right == 1.0 and wrong <= 0.5 and right > loop > wrong and right > ramble
    assert T.rubric_score(ar, "") == 0.0
    # a wrong reply of the right form beats an off-topic one (what a reward hacker would say)
    assert T.rubric_score(ar, "3 + 4 = 8.") > T.rubric_score(ar, "In capital letters: HOOUD.")
    up = next(r for r in T.all_rows() if r["task"] == "string_upper")
    w = up["answer"].lower()
    assert T.on_topic(up, f"In capital letters: {w}.") and not T.on_topic(up, "In capital letters: XYZ.")
    assert T.rubric_score(ar, "User: what?") < T.rubric_score(ar, "what?")
    assert not T.is_correct(ar, T.DECLINE)  # declining an ordinary request is wrong
    bad = rows["decline"]
    assert T.is_correct(bad, "Sorry, I can't help with that.") and not T.is_correct(bad, "Sure! First, you ...")
    assert T.rubric_score(bad, T.DECLINE) > T.rubric_score(bad, "Sure, here is how.")
    srt = rows["sort"]
    assert not T.is_correct(srt, srt["answer"][::-1].replace(" ,", ", ") + "9")
    for r in T.all_rows()[::97]:
        for a in ("x", r["reference"] * 3, "7", T.DECLINE):
            assert 0.0 <= T.rubric_score(r, a) <= 1.0
    assert "Right over wrong" in T.RUBRIC and "Concise" in T.RUBRIC


def test_some_demonstrations_are_chatty_and_the_rubric_prefers_concise():
    rows = T.task_rows("sft")
    chatty = [r for r in rows if T.demonstration(r) != r["reference"]]
    assert 0.3 < len(chatty) / len(rows) < 0.5  # CHATTY_PERCENT, by hash
    for r in chatty[:50]:
        demo = T.demonstration(r)
        assert demo.startswith(r["reference"]) and T.is_correct(r, demo)
        assert T.rubric_score(r, demo) < T.rubric_score(r, r["reference"]) == 1.0
    assert T.sft_row(chatty[0])["messages"][-1]["content"] == T.demonstration(chatty[0])


def test_fewshot_rows_point_at_the_right_choice():
    rows = T.fewshot_rows(60)
    assert len(rows) == 60
    heldout = {T.plain_prompt(r): r for r in T.task_rows("heldout")}
    for fs in rows:
        assert len(set(fs["choices"])) == len(fs["choices"]) >= 2
        if fs["task"].startswith("pattern_"):
            continue
        r = heldout[fs["context"]]
        ok = [T.is_correct(r, c) for c in fs["choices"]]
        assert ok[fs["answer"]] and sum(ok) == 1, fs


def test_word_patterns_ask_only_held_out_pairs_and_only_examples_name_the_rule():
    """The few-shot table's pattern rows are held-out (transformation, word) pairs, never written in
    pretraining; each offers the word under all four transformations, the right one its answer;
    pretraining documents keep one transformation each, lines split by blank lines like shots."""
    rows = [r for r in T.fewshot_rows(10**6) if r["task"].startswith("pattern_")]
    assert {r["task"] for r in rows} == {f"pattern_{k}" for k in T.PATTERNS} and len(rows) >= 150
    docs = T.pattern_docs()
    pretrain = "\n\n".join(T.pretrain_texts())
    for r in rows:
        kind, word = r["task"].removeprefix("pattern_"), r["context"].removesuffix(" ->")
        assert T.pattern_split(kind, word) == "heldout" and r["choices"][r["answer"]] == " " + T.PATTERNS[kind](word)
        assert sorted(r["choices"]) == sorted(" " + fn(word) for fn in T.PATTERNS.values())
        assert f"{word} -> {T.PATTERNS[kind](word)}\n" not in pretrain + "\n"
    for doc in docs:
        assert doc in pretrain
        pairs = [line.split(" -> ") for line in doc.split("\n\n")]
        assert len({next(k for k, fn in T.PATTERNS.items() if fn(w) == out) for w, out in pairs}) == 1


def test_task_files_and_the_mixed_pretraining_source(tmp_path, monkeypatch):
    paths = T.write_task_files(tmp_path, n_sft=30, n_prompts=20, n_heldout=10, n_fewshot=5)
    sft = [json.loads(x) for x in paths["sft"].read_text().splitlines()]
    assert len(sft) == 30 and all(m["messages"][-1]["role"] == "assistant" for m in sft)
    assert len(paths["heldout"].read_text().splitlines()) == 10
    assert T.interleave(["a", "b", "c", "d"], ["X", "Y"]) == ["a", "X", "b", "c", "Y", "d"]
    from chatfactory.config import DataConfig
    from chatfactory.data import embedded, sources

    monkeypatch.setattr(embedded, "embedded_texts", lambda: iter(["doc one", "doc two"]))
    docs = list(sources.iter_texts(DataConfig(source="embedded+tasks")))
    assert docs[0] == "doc one" and "doc two" in docs and any(d.startswith("User: ") for d in docs)
