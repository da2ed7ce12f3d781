"""The embedded default's tasks (data/tasks.py): disjoint splits (dev and heldout never trained on),
determinism, and the rubric's judgements (data/rubric.py)."""

import json

import pytest

from chatfactory.data import rubric, tasks
from chatfactory.tokenizer import check_messages


def test_rows_are_deterministic_and_well_formed():
    a, b = tasks.all_rows(), tasks.all_rows()
    assert a == b and len(a) > 3000
    for r in a:
        check_messages(r["messages"])
        assert r["messages"][-1]["role"] == "user"
        assert r["task"] and r["reference"] and r["answer"]
    assert tasks.task_rows("rl", 50, seed=1) == tasks.task_rows("rl", 50, seed=1)
    assert tasks.task_rows("rl", 50, seed=1) != tasks.task_rows("rl", 50, seed=2)
    with pytest.raises(ValueError, match="unknown task split 'train'"):
        tasks.task_rows("train")


def test_every_family_has_several_phrasings():
    rows = tasks.all_rows()
    names = {r["task"] for r in rows}
    assert {"arithmetic", "string_reverse", "string_upper", "string_count", "compare", "sort", "python_fact",
            "greeting", "recall_name", "decline"} <= names
    # the same arithmetic question asked in more than one way
    asks = {r["messages"][-1]["content"] for r in rows if r["task"] == "arithmetic" and r["reference"] == "3 + 4 = 7."}
    assert len(asks) >= 4
    assert any(len(r["messages"]) == 3 for r in rows)  # multi-turn small talk
    # facts come from this Python's own docstrings
    assert tasks.builtin_facts()["len"] == "Return the number of items in a container."


def test_splits_are_disjoint_and_dev_and_heldout_never_reach_training():
    texts = {s: {tasks.prompt_text(r) for r in tasks.task_rows(s)} for s in tasks.SPLITS}
    for i, a in enumerate(tasks.SPLITS):
        for b in tasks.SPLITS[i + 1:]:
            assert not (texts[a] & texts[b]), (a, b)
    assert sum(map(len, texts.values())) == len({tasks.prompt_text(r) for r in tasks.all_rows()})  # each in one split
    assert len(texts["heldout"]) >= 400 and 200 <= len(texts["dev"]) <= 260
    for split in ("dev", "heldout"):
        some = tasks.task_rows(split, 160)
        assert len({r["task"] for r in some}) >= 10  # round-robin: a small n still covers the tasks
    pretrain = "\n".join(tasks.pretrain_texts())
    assert sum(tasks.plain_prompt(r) in pretrain for r in tasks.task_rows("sft", 100)) > 90
    for split in ("dev", "heldout"):
        assert not any(tasks.plain_prompt(r) + " " in pretrain for r in tasks.task_rows(split)), split


def test_dev_was_carved_out_of_rl_alone():
    """Adding dev moved only rl prompts: the hash thresholds of sft and heldout are as they were
    (15% heldout, then 40% sft), so SFT's data and the held-out evaluation did not change."""
    import hashlib

    for r in tasks.all_rows()[::7]:
        h = int(hashlib.sha256(tasks.prompt_text(r).encode()).hexdigest()[:8], 16) % 100
        before = "heldout" if h < 15 else "sft" if h < 55 else "rl"
        assert tasks.split_of(r) == before or (before, tasks.split_of(r)) == ("rl", "dev")


def test_rubric_prefers_right_concise_clean_and_declines():
    rows = {r["task"]: r for r in tasks.task_rows("heldout")}
    for task, r in rows.items():
        assert rubric.rubric_score(r, r["reference"]) == 1.0, task
        assert rubric.is_correct(r, r["reference"] + "<|end|>garbage"), task
    ar = next(r for r in tasks.all_rows() if r["reference"] == "3 + 4 = 7.")
    right, wrong = rubric.rubric_score(ar, "3 + 4 = 7."), rubric.rubric_score(ar, "3 + 4 = 8.")
    ramble = rubric.rubric_score(ar, "3 + 4 = 7. " + " ".join(f"And {i} more things to say." for i in range(10)))
    loop = rubric.rubric_score(ar, "The answer is 7. The answer is 7.")
    assert right == 1.0 and wrong <= 0.5 and right > loop > wrong and right > ramble
    assert rubric.rubric_score(ar, "") == 0.0
    # a wrong reply of the right form beats an off-topic one (what a reward hacker would say)
    assert rubric.rubric_score(ar, "3 + 4 = 8.") > rubric.rubric_score(ar, "In capital letters: HOOUD.")
    up = next(r for r in tasks.all_rows() if r["task"] == "string_upper")
    w = up["answer"].lower()
    assert rubric.on_topic(up, f"In capital letters: {w}.") and not rubric.on_topic(up, "In capital letters: XYZ.")
    assert rubric.rubric_score(ar, "User: what?") < rubric.rubric_score(ar, "what?")
    assert not rubric.is_correct(ar, rubric.DECLINE)  # declining an ordinary request is wrong
    bad = rows["decline"]
    assert rubric.is_correct(bad, "Sorry, I can't help with that.") and not rubric.is_correct(bad, "Sure! First, you ...")
    assert rubric.rubric_score(bad, rubric.DECLINE) > rubric.rubric_score(bad, "Sure, here is how.")
    srt = rows["sort"]
    assert not rubric.is_correct(srt, srt["answer"][::-1].replace(" ,", ", ") + "9")
    for r in tasks.all_rows()[::97]:
        for a in ("x", r["reference"] * 3, "7", rubric.DECLINE):
            assert 0.0 <= rubric.rubric_score(r, a) <= 1.0
    assert "Right over wrong" in rubric.RUBRIC and "Concise" in rubric.RUBRIC
    from chatfactory.scorer import load_scorer

    # the scorer's name in configs and older run directories still loads it
    assert load_scorer("chatfactory.data.tasks:rubric_score") is load_scorer("chatfactory.data.rubric:rubric_score")


def test_some_demonstrations_are_chatty_and_the_rubric_prefers_concise():
    rows = tasks.task_rows("sft")
    chatty = [r for r in rows if tasks.demonstration(r) != r["reference"]]
    assert 0.3 < len(chatty) / len(rows) < 0.5  # CHATTY_PERCENT, by hash
    for r in chatty[:50]:
        demo = tasks.demonstration(r)
        assert demo.startswith(r["reference"]) and rubric.is_correct(r, demo)
        assert rubric.rubric_score(r, demo) < rubric.rubric_score(r, r["reference"]) == 1.0
    assert tasks.sft_row(chatty[0])["messages"][-1]["content"] == tasks.demonstration(chatty[0])


def test_fewshot_rows_point_at_the_right_choice():
    rows = tasks.fewshot_rows(60)
    assert len(rows) == 60
    heldout = {tasks.plain_prompt(r): r for r in tasks.task_rows("heldout")}
    for fs in rows:
        assert len(set(fs["choices"])) == len(fs["choices"]) >= 2
        if fs["task"].startswith("pattern_"):
            continue
        r = heldout[fs["context"]]
        ok = [rubric.is_correct(r, c) for c in fs["choices"]]
        assert ok[fs["answer"]] and sum(ok) == 1, fs


def test_word_patterns_ask_only_held_out_pairs_and_only_examples_name_the_rule():
    """The few-shot table's pattern rows are held-out (transformation, word) pairs, never written in
    pretraining; each offers the word under all four transformations, the right one its answer;
    pretraining documents keep one transformation each, lines split by blank lines like shots."""
    rows = [r for r in tasks.fewshot_rows(10**6) if r["task"].startswith("pattern_")]
    assert {r["task"] for r in rows} == {f"pattern_{k}" for k in tasks.PATTERNS} and len(rows) >= 150
    docs = tasks.pattern_docs()
    pretrain = "\n\n".join(tasks.pretrain_texts())
    for r in rows:
        kind, word = r["task"].removeprefix("pattern_"), r["context"].removesuffix(" ->")
        assert tasks.pattern_split(kind, word) == "heldout" and r["choices"][r["answer"]] == " " + tasks.PATTERNS[kind](word)
        assert sorted(r["choices"]) == sorted(" " + fn(word) for fn in tasks.PATTERNS.values())
        assert f"{word} -> {tasks.PATTERNS[kind](word)}\n" not in pretrain + "\n"
    for doc in docs:
        assert doc in pretrain
        pairs = [line.split(" -> ") for line in doc.split("\n\n")]
        assert len({next(k for k, fn in tasks.PATTERNS.items() if fn(w) == out) for w, out in pairs}) == 1


def test_task_files_and_the_mixed_pretraining_source(tmp_path, monkeypatch):
    paths = tasks.write_task_files(tmp_path, n_sft=30, n_prompts=20, n_heldout=10, n_fewshot=5, n_dev=12)
    sft = [json.loads(x) for x in paths["sft"].read_text().splitlines()]
    assert len(sft) == 30 and all(m["messages"][-1]["role"] == "assistant" for m in sft)
    assert len(paths["heldout"].read_text().splitlines()) == 10
    dev = [json.loads(x) for x in (tmp_path / "dev.jsonl").read_text().splitlines()]
    assert paths["dev"] == tmp_path / "dev.jsonl" and dev == tasks.task_rows("dev", 12)
    assert tasks.interleave(["a", "b", "c", "d"], ["X", "Y"]) == ["a", "X", "b", "c", "Y", "d"]
    from chatfactory.config import DataConfig
    from chatfactory.data import embedded, sources

    monkeypatch.setattr(embedded, "embedded_texts", lambda: iter(["doc one", "doc two"]))
    docs = list(sources.iter_texts(DataConfig(source="embedded+tasks")))
    assert docs[0] == "doc one" and "doc two" in docs and any(d.startswith("User: ") for d in docs)
