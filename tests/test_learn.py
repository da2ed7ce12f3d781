"""`chatfactory learn` (learn.py): a flywheel round on a tiny run — the votes it reads, what it writes,
a round with too few votes, resume after an interruption, promote and rollback. Whether a round makes the
model better is measured at the demo's size (bench/flywheel.py; docs/flywheel.md): a tiny model trained
for seconds proves the plumbing, not the learning."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from chatfactory.config import load_config
from chatfactory.data.raters import rater_choice, vote_body
from chatfactory.learn import learn_round
from chatfactory.serve.feedback import FILENAME, FeedbackStore
from chatfactory.store.versions import Versions
from conftest import cli_cmd

ROUND = ["learn.min_pairs=20", "learn.policy_epochs=2", "learn.policy_lr=0.0005", "learn.dev_rows=24"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """pipeline-tiny up to its reward model (tasks, SFT, reward), built once per module by the CLI."""
    import subprocess

    out = tmp_path_factory.mktemp("learn") / "run"
    subprocess.run(cli_cmd("run", "--config", "pipeline-tiny", "--out", out,
                           "pipeline.stages=pretrain,sft,comparisons,reward"), check=True, capture_output=True)
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("state.pt"))
    return dst


def vote(run, n: int, start: int = 0, kind: str = "gold", raters: int = 3, seed: int = 0) -> None:
    """``n`` compare-mode votes by simulated raters on the run's RL prompts: the reference reply against a
    wrong one (the last number changed, or a reply that does not answer)."""
    rows = [json.loads(line) for line in (run / "tasks" / "prompts.jsonl").read_text().splitlines()]
    store, rng = FeedbackStore(run / FILENAME), random.Random(seed)
    for i in range(start, start + n):
        row = rows[i % len(rows)]
        good = row["reference"]
        bad = good.replace(row["answer"], str(int(row["answer"]) + 1)) if row["answer"].isdigit() else "Hmm."
        a, b = (good, bad) if rng.random() < 0.5 else (bad, good)
        body = vote_body(row, a, b, rater_choice(kind, row, a, b, rng, noise=0.1), shown_left=rng.randrange(2))
        store.add(body, model="run/v1", rater=store.rater_id("cookie", f"rater{i % raters}"))


def test_a_round_reads_the_new_votes_trains_gates_and_records_it(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    cfg = load_config(str(run / "config.yaml"), ROUND)
    with pytest.raises(FileNotFoundError, match="no votes yet"):
        learn_round(cfg, run)
    vote(run, 60)
    res = learn_round(cfg, run)
    v = Versions(run)
    assert res["version"] == 2 and v.numbers() == [1, 2]
    info, gate = v.info(2), json.loads((v.dir(2) / "gate.json").read_text())
    # version 1 is the run's last policy (SFT here), copied; version 2 trained from it on this round's votes
    assert v.info(1)["source"].endswith("sft") and (v.policy_dir(1) / "model.safetensors").exists()
    assert info["export"]["votes"] == 60 and info["export"]["pairs"] + sum(info["export"]["dropped"].values()) == 60
    assert info["export"]["train"] + info["export"]["heldout"] == info["export"]["pairs"]
    assert info["last_vote_id"] == 60 and info["policy"] == "dpo" and info["reward"] == "reward"
    pairs = [json.loads(line) for line in (v.dir(2) / "votes.jsonl").read_text().splitlines()]
    assert all(p["vote_id"] % 10 for p in pairs)  # every 10th vote's pair is held out
    assert set(gate["checks"]) == {"win_rate", "accuracy", "kl_to_sft", "length"} and gate["parent"] == 1
    assert gate["passed"] == all(c["passed"] for c in gate["checks"].values())
    assert res["status"] == ("promoted" if gate["passed"] else "rejected")
    assert v.serving() == (2 if gate["passed"] else 1)
    dpo = load_file(v.dir(2) / "dpo" / "model.safetensors")
    start = load_file(v.policy_dir(1) / "model.safetensors")
    assert any(not torch.equal(dpo[k], start[k]) for k in start)  # the policy round trained
    assert set(res["seconds"]) == {"export", "reward", "policy", "gate"}

    # no new votes: the next round stops before training and leaves nothing behind
    again = learn_round(cfg, run)
    assert again["status"] == "too_few_pairs" and "learn.min_pairs=20" in again["message"]
    assert v.numbers() == [1, 2]
    # new votes: the next round reads only them, from the version served now
    vote(run, 40, start=60)
    third = learn_round(cfg, run)
    assert third["version"] == 3 and v.info(3)["export"]["votes"] == 40
    assert v.info(3)["parent"] == (2 if gate["passed"] else 1)
    assert v.info(3)["export"]["after_id"] == 60
    reward_data = [json.loads(line) for line in (v.dir(3) / "votes.jsonl").read_text().splitlines()]
    assert min(p["vote_id"] for p in reward_data) > 60  # the policy round trains on this round's pairs


def test_an_interrupted_round_resumes_to_the_same_version(tiny_run, tmp_path, monkeypatch):
    torch.set_num_threads(1)  # bitwise equality across two trainings needs one thread's summation order
    whole, broken = copy_run(tiny_run, tmp_path / "whole"), copy_run(tiny_run, tmp_path / "broken")
    for r in (whole, broken):
        vote(r, 60, seed=1)
    cfg = [load_config(str(r / "config.yaml"), ROUND) for r in (whole, broken)]
    a = learn_round(cfg[0], whole)

    import chatfactory.learn as learn

    real = learn.run_gate

    def killed(*args, **kw):
        raise KeyboardInterrupt("killed after the policy round")

    monkeypatch.setattr(learn, "run_gate", killed)
    with pytest.raises(KeyboardInterrupt):
        learn_round(cfg[1], broken)
    assert Versions(broken).info(2)["status"] == "candidate" and Versions(broken).serving() == 1
    monkeypatch.setattr(learn, "run_gate", real)
    b = learn_round(cfg[1], broken)
    assert (a["version"], a["status"]) == (b["version"], b["status"])
    for part in ("reward", "dpo"):
        wa, wb = (load_file(r / "versions" / "2" / part / "model.safetensors") for r in (whole, broken))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part
    ga, gb = (json.loads((r / "versions" / "2" / "gate.json").read_text()) for r in (whole, broken))
    assert ga["checks"] == gb["checks"]


def test_rollback_from_the_command_line(tiny_run, tmp_path):
    import subprocess

    run = copy_run(tiny_run, tmp_path / "run")
    v = Versions(run)
    v.ensure_first(run / "sft")
    n = v.candidate(1)
    shutil.copytree(run / "sft", v.dir(n) / "policy")
    v.write_info(n, policy="policy")
    v.promote(n)
    out = subprocess.run(cli_cmd("rollback", "--run", run), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert v.serving() == 1 and "serving version 1 (was 2)" in out.stdout
    bad = subprocess.run(cli_cmd("rollback", "--run", run, "--to", "7"), capture_output=True, text=True)
    assert bad.returncode != 0 and "no version 7" in bad.stderr and v.serving() == 1


def test_the_arena_gate_waits_for_peoples_votes_then_decides_by_them(tiny_run, tmp_path, monkeypatch):
    import chatfactory.learn as learn

    run = copy_run(tiny_run, tmp_path / "run")
    vote(run, 60)
    # the dev gate passes here by decree: this test is about what the arena adds to it
    monkeypatch.setattr(learn, "run_gate", lambda *a, **k: {"passed": True, "checks": {"win_rate": {"passed": True}}})
    cfg = load_config(str(run / "config.yaml"), ROUND + ["learn.gate=arena", "learn.arena_votes=40"])
    res = learn_round(cfg, run)
    v = Versions(run)
    assert res["status"] == "in_arena" and "0 of learn.arena_votes=40" in res["message"]
    assert v.arena_candidate() == 2 and v.info(2)["status"] == "candidate" and v.serving() == 1
    store, rng = FeedbackStore(run / FILENAME), random.Random(3)

    def battles(k: int, start: int, p_candidate: float) -> None:
        for i in range(start, start + k):
            models = [v.name(2), v.name(1)] if i % 2 else [v.name(1), v.name(2)]
            won = rng.random() < p_candidate  # the candidate's answer preferred
            choice = "a" if won == (models[0] == v.name(2)) else "b"
            item = {"kind": "comparison", "messages": [{"role": "user", "content": f"arena prompt {i}"}],
                    "answers": [f"answer {i} one", f"answer {i} two"], "choice": choice, "models": models}
            store.add(item, rater=store.rater_id("cookie", f"r{i % 5}"), battle=f"battle-{i}")

    battles(20, 0, 0.85)
    assert learn_round(cfg, run)["status"] == "in_arena" and v.arena_candidate() == 2  # 20 of 40: still waiting
    battles(30, 20, 0.85)
    done = learn_round(cfg, run)
    gate = json.loads((v.dir(2) / "gate.json").read_text())
    assert done["status"] == "promoted" and v.serving() == 2 and v.arena_candidate() is None
    assert gate["checks"]["arena"]["votes"] == 50 and gate["checks"]["arena"]["lo"] > 0 and gate["passed"]
    # a candidate people do not prefer is rejected once its votes are in, and the served version stays
    vote(run, 60, start=60, seed=2)
    assert learn_round(cfg, run)["status"] == "in_arena" and v.arena_candidate() == 3
    for i in range(50, 100):
        models = [v.name(3), v.name(2)]
        item = {"kind": "comparison", "messages": [{"role": "user", "content": f"arena prompt {i}"}],
                "answers": [f"answer {i} one", f"answer {i} two"], "choice": "b" if i % 5 else "a", "models": models}
        store.add(item, rater=store.rater_id("cookie", f"r{i % 5}"), battle=f"battle-{i}")
    assert learn_round(cfg, run)["status"] == "rejected" and v.serving() == 2 and v.arena_candidate() is None
