"""The flywheel's versions (store/versions.py) and its gate's decision (eval/gate.py), without training."""

from __future__ import annotations

import json
import random

import pytest

from chatfactory.config import LearnConfig
from chatfactory.eval.gate import accuracy_check, decide, length_check, win_check
from chatfactory.store.files import CheckpointError
from chatfactory.store.versions import Versions
from conftest import make_run


def test_version_one_is_a_copy_of_the_stage_served_until_a_promotion(tmp_path):
    run = make_run(tmp_path / "run")
    v = Versions(run)
    assert v.serving() is None and v.numbers() == []
    assert v.ensure_first(run / "sft") == 1
    assert v.serving() == 1 and v.info(1)["status"] == "first"
    assert (v.policy_dir(1) / "model.safetensors").read_bytes() == (run / "sft" / "model.safetensors").read_bytes()
    assert not (v.policy_dir(1) / "state.pt").exists()
    v.ensure_first(run / "sft")  # a second call changes nothing
    assert v.numbers() == [1] and len(v.serving_record()["history"]) == 1

    n = v.candidate(parent=1)
    assert n == 2 and v.candidate(parent=1) == 2  # an unfinished round is resumed, not duplicated
    with pytest.raises(CheckpointError, match="unfinished round from version 1"):
        v.candidate(parent=3)
    v.reject(2)
    assert v.serving() == 1  # a rejected candidate is never served
    with pytest.raises(ValueError, match="rejected"):
        v.rollback(to=2)
    with pytest.raises(ValueError, match="only one ever served"):
        v.rollback()

    n = v.candidate(parent=1)
    assert n == 3
    v.write_info(3, policy="policy", last_vote_id=40)
    v.promote(3)
    assert v.serving() == 3 and v.last_vote_id() == 40 and v.last_vote_id(exclude=3) == 0
    assert v.rollback() == 1 and v.serving() == 1
    assert v.rollback(to=3) == 3
    assert [h["action"] for h in v.serving_record()["history"]] == ["first", "promote", "rollback", "rollback"]


def test_a_round_that_stops_early_leaves_nothing_and_damage_is_named(tmp_path):
    run = make_run(tmp_path / "run")
    v = Versions(run)
    v.ensure_first(run / "sft")
    n = v.candidate(parent=1)
    v.discard(n)
    assert v.numbers() == [1]
    with pytest.raises(ValueError, match="not a candidate"):
        v.discard(1)
    v.serving_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="serving.json: corrupt"):
        v.serving()
    (v.dir(1) / "version.json").write_text(json.dumps({"version": 7}))
    with pytest.raises(CheckpointError, match="corrupt version record"):
        v.info(1)
    with pytest.raises(CheckpointError, match="no version 9"):
        v.info(9)


def test_the_win_check_needs_the_rate_and_an_interval_above_a_coin_flip():
    assert win_check([1.0] * 70 + [0.0] * 30, 0.55)["passed"]
    coin = [float(random.Random(s).random() < 0.5) for s in range(160)]
    assert not win_check(coin, 0.55)["passed"]
    # 0.58 on 40 prompts: above min_win but the interval reaches below 0.5
    small = win_check([1.0] * 23 + [0.0] * 17, 0.55)
    assert small["value"] > 0.55 and small["lo"] < 0.5 and not small["passed"]
    assert win_check([0.5] * 100, 0.55)["value"] == 0.5


def test_accuracy_and_length_checks():
    serv = [1.0] * 50 + [0.0] * 50 + [None] * 10
    same = accuracy_check(list(serv), serv, 1.0)
    assert same["passed"] and same["diff"] == 0 and same["n"] == 100
    worse = accuracy_check([0.0] * 20 + serv[20:], serv, 1.0)  # 20 right answers lost
    assert not worse["passed"] and worse["diff"] == pytest.approx(-0.2)
    assert accuracy_check([None, None], [None, None], 1.0)["passed"]
    assert length_check([100] * 10, [90] * 10, 0.25)["passed"]
    assert not length_check([130] * 10, [100] * 10, 0.25)["passed"]
    assert not length_check([70] * 10, [100] * 10, 0.25)["passed"]


def test_decide_passes_a_better_policy_and_rejects_a_length_hacker():
    rows = [{"messages": [{"role": "user", "content": f"{i}+1=?"}], "task": "arithmetic", "answer": str(i + 1)}
            for i in range(120)]
    serving = [f"{i + 1 if i % 2 else i}." for i in range(120)]  # half right
    better = [f"{i + 1}." for i in range(120)]  # all right
    settings = LearnConfig()

    def judge(row, answer):
        return float(answer.strip(". ") == row["answer"])

    ok = decide(rows, better, serving, judge, kl=1.0, settings=settings)
    assert ok["passed"] and ok["checks"]["win_rate"]["value"] == pytest.approx(0.75)
    # the same answers padded: the judge (which ignores length) still prefers them, the length band does not
    padded = [a + " I hope this helps, ask me anything else!" for a in better]
    hack = decide(rows, padded, serving, lambda r, a: judge(r, a.split()[0]), kl=1.0, settings=settings)
    assert hack["checks"]["win_rate"]["passed"] and not hack["checks"]["length"]["passed"] and not hack["passed"]
    assert not decide(rows, better, serving, judge, kl=settings.max_kl + 1, settings=settings)["passed"]
    with pytest.raises(ValueError, match="120 prompts but 3 candidate"):
        decide(rows, better[:3], serving, judge, 0.0, settings)
