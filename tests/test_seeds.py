"""Results over seeds: the repeat dial (pipeline.seed, config.py ``with_run_seed``), each aligned stage's record
against SFT on the same prompts (eval/heldout.py ``versus_sft``), and the table over repeats of a run
(eval/seeds.py, ``chatfactory seeds``) checked against numbers worked out by hand."""

import json
import math

import pytest
import yaml

from chatfactory.config import load_config, with_run_seed
from chatfactory.eval.heldout import prompts_sha, score_replies, versus_sft, vs_sft_md, win_vs
from chatfactory.eval.seeds import seeds_report
from chatfactory.eval.stats import length_controlled_win_rate
from conftest import ROOT, cli_cmd

SECTIONS = ("pretrain", "sft", "comparisons", "reward", "dpo", "ppo", "grpo", "rloo")


def test_the_dial_moves_every_seed_but_the_tasks():
    """pipeline.seed=3 adds 3 to every section's seed and to eval_seed, leaves tasks_seed, and is spent: the
    copy's dial is 0, so applying it again (a run started from its own saved config) changes nothing."""
    base = load_config("demo")
    cfg = load_config("demo", ["pipeline.seed=3", "ppo.seed=100"])
    got = with_run_seed(cfg)
    for s in SECTIONS:
        want = 103 if s == "ppo" else getattr(base, s).seed + 3
        assert getattr(got, s).seed == want, s
    assert got.pipeline.eval_seed == base.pipeline.eval_seed + 3
    assert got.pipeline.tasks_seed == base.pipeline.tasks_seed
    assert got.pipeline.seed == 0 and cfg.pipeline.seed == 3 and cfg.ppo.seed == 100  # the input is left as it was
    assert with_run_seed(got).to_dict() == got.to_dict()
    assert with_run_seed(base).to_dict() == base.to_dict()  # dial 0: nothing moves


def test_the_pipeline_saves_the_seeds_it_used(tmp_path):
    """RUN/config.yaml of a run with pipeline.seed=2 holds every seed moved by 2 and the same tasks_seed, and its
    held-out prompts are the dial-0 run's (a run with no stages: the task files and the saved config only)."""
    from chatfactory import pipeline

    saved = {}
    for dial in (0, 2):
        out = tmp_path / f"seed{dial}"
        cfg = load_config("pipeline-tiny", ["pipeline.stages=", f"pipeline.seed={dial}", "pipeline.heldout=20"])
        pipeline.run_pipeline(cfg, out, log=lambda *_: None)
        saved[dial] = yaml.safe_load((out / "config.yaml").read_text())
        assert cfg.pipeline.seed == dial  # the caller's config is not changed
    for s in SECTIONS:
        assert saved[2][s]["seed"] == saved[0][s]["seed"] + 2, s
    assert saved[2]["pipeline"]["eval_seed"] == saved[0]["pipeline"]["eval_seed"] + 2
    assert saved[2]["pipeline"]["tasks_seed"] == saved[0]["pipeline"]["tasks_seed"]
    assert saved[2]["pipeline"]["seed"] == 0
    held = [(tmp_path / f"seed{d}" / "tasks" / "heldout.jsonl").read_text() for d in (0, 2)]
    assert held[0] == held[1] and held[0].count("\n") == 20


def _rows():
    from chatfactory.data import tasks

    return [r for r in tasks.task_rows("heldout", 40) if r["task"] in ("arithmetic", "compare", "sort")][:6]


def test_versus_sft_pairs_the_cached_verdicts():
    """versus_sft, from two cached evaluations: the win rate equals the rubric-judged count (win_vs), the reply
    lengths are the replies' characters, McNemar counts the prompts only one of them got right."""
    rows = _rows()
    sft_replies = [rows[0]["reference"], rows[1]["reference"], "no idea", "no idea", rows[4]["reference"], "x"]
    mine = [rows[0]["reference"], "nope", rows[2]["reference"], rows[3]["reference"], rows[4]["reference"], "y"]
    sft, res = score_replies(rows, sft_replies), score_replies(rows, mine)
    sft["replies"], res["replies"] = sft_replies, mine
    assert res["reply_chars"] == [len(a) for a in mine]
    v = versus_sft(res, sft)
    assert v["win_rate"] == win_vs(rows, mine, sft_replies)["win_rate"]
    assert v["mean_chars"] == sum(map(len, mine)) / 6 and v["sft_mean_chars"] == sum(map(len, sft_replies)) / 6
    mc = v["mcnemar"]
    assert (mc["a_only"], mc["b_only"], mc["both"], mc["neither"]) == (1, 2, 2, 1)
    assert mc["diff"] == pytest.approx(1 / 6) and mc["p"] == 1.0
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(res["scores"], sft["scores"])]
    lc = length_controlled_win_rate(wins, res["reply_chars"], sft["reply_chars"])
    assert v["lc_win_rate"] == lc["lc_win_rate"] and v["n_matched"] == lc["n_matched"]
    del res["reply_chars"]  # a cache written before reply_chars: the lengths come from the replies
    assert versus_sft(res, sft) == v
    md = "\n".join(vs_sft_md({"sft": sft, "ppo": {**res, "vs_sft": v}}))
    assert f"- ppo: mean reply {v['mean_chars']:.1f} characters (SFT {v['sft_mean_chars']:.1f})" in md
    assert "McNemar p = 1 (right only here 2, only in SFT 1)" in md


# ---------------------------------------------------------------- three fake runs with known per-prompt verdicts
SFT_CORRECT = ([1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0])  # accuracy 0.5, 0.25, 0.75
PPO_CORRECT = ([1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1])  # 0.75, 0.5, 0.75: paired differences 0.25, 0.25, 0
PPO_SCORES = ([1, 1, 0, 0.5], [1, 0.5, 0.5, 0.5], [1, 1, 1, 0])  # against SFT's 0.5 everywhere: wins .625 .625 .75
PPO_CHARS = ([5, 9, 12, 20], [7, 7, 30, 4], [10, 10, 10, 40])
SFT_CHARS = [10, 10, 10, 10]


def _cache(correct, scores, chars, sha="abc123") -> dict:
    n = len(correct)
    return {"n": n, "heldout_accuracy": sum(correct) / n, "gold_score": sum(scores) / n, "correct": correct,
            "scores": scores, "reply_chars": chars, "replies": ["r" * c for c in chars], "prompts_sha": sha}


def _fake_run(path, i, sha="abc123", stages=("sft", "ppo")):
    (path / "eval").mkdir(parents=True)
    caches = {"sft": _cache(SFT_CORRECT[i], [0.5] * 4, SFT_CHARS, sha),
              "ppo": _cache(PPO_CORRECT[i], PPO_SCORES[i], PPO_CHARS[i], sha),
              "dpo": _cache(SFT_CORRECT[i], [0.5] * 4, SFT_CHARS, sha)}
    for s in stages:
        (path / "eval" / f"{s}.json").write_text(json.dumps(caches[s]))
    cfg = with_run_seed(load_config("demo", [f"pipeline.seed={i}"]))
    (path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def test_seeds_table_by_hand(tmp_path):
    runs = [_fake_run(tmp_path / f"run{i}", i, stages=("sft", "ppo", "dpo") if i < 2 else ("sft", "ppo"))
            for i in range(3)]
    md, got = seeds_report(runs, tmp_path / "out" / "seeds.md")
    sft, ppo = got["stages"]["sft"], got["stages"]["ppo"]
    assert sft["accuracy"]["values"] == [0.5, 0.25, 0.75]
    assert sft["accuracy"]["mean"] == pytest.approx(0.5) and sft["accuracy"]["se"] == pytest.approx(0.25 / math.sqrt(3))
    assert ppo["accuracy"]["mean"] == pytest.approx(2 / 3) and ppo["accuracy"]["se"] == pytest.approx(1 / 12)
    assert ppo["win_rate"]["values"] == [0.625, 0.625, 0.75]
    assert ppo["win_rate"]["mean"] == pytest.approx(2 / 3) and ppo["win_rate"]["se"] == pytest.approx(1 / 24)
    assert ppo["win_rate"]["lower"] == pytest.approx(7 / 12)
    assert ppo["mean_chars"]["values"] == [11.5, 12.0, 17.5] and ppo["sft_mean_chars"]["mean"] == 10.0
    lc = [length_controlled_win_rate([1.0 if s > 0.5 else 0.5 if s == 0.5 else 0.0 for s in sc], ch, SFT_CHARS)
          for sc, ch in zip(PPO_SCORES, PPO_CHARS)]
    assert ppo["lc_win_rate"]["values"] == [x["lc_win_rate"] for x in lc]
    acc = got["vs_sft"]["ppo"]["accuracy"]  # per-seed differences 0.25, 0.25, 0
    assert acc["diff"] == pytest.approx(1 / 6) and acc["se_diff"] == pytest.approx(1 / 12)
    assert acc["lower"] == pytest.approx(0.0, abs=1e-12)
    pooled = got["vs_sft"]["ppo"]["mcnemar_pooled"]  # 12 items: 3 right only in PPO, 1 only in SFT
    assert (pooled["n"], pooled["b_only"], pooled["a_only"]) == (12, 3, 1)
    assert pooled["p"] == pytest.approx(10 / 16)  # 2 * P(X <= 1), X ~ Binomial(4, 1/2)
    assert got["vs_sft"]["ppo"]["mcnemar_p_per_seed"] == [1.0, 1.0, 1.0]
    assert "dpo" not in got["stages"] and got["left_out"] == {"dpo": [str(runs[2])]}
    assert got["warnings"] == [] and [r["seeds"]["eval_seed"] for r in got["runs"]] == [0, 1, 2]
    assert "| ppo | 0.667 ± 0.083 | " in md and "0.667 ± 0.042 (− 2 SE: 0.583)" in md
    assert "| ppo | +0.167 ± 0.083 | +0.000 | p = 0.625 (right only here 3, only in SFT 1; 12 items) | 1, 1, 1 |" in md
    assert "Left out: dpo, not evaluated in" in md
    written = json.loads((tmp_path / "out" / "seeds.json").read_text())
    assert written["vs_sft"]["ppo"]["accuracy"]["diff"] == pytest.approx(1 / 6)
    assert (tmp_path / "out" / "seeds.md").read_text() == md


CALC_SFT = ([1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0])  # 0.5, 0.75, 0.25 with the calculator
CALC_PPO = ([1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0])  # 0.75, 1.0, 0.5: +0.25 on every seed


def test_seeds_table_of_the_calculator(tmp_path):
    """Runs that evaluated the calculator: its accuracy, right-call rate and accuracy without it over the runs,
    McNemar with vs without on every run's problems pooled, and the seed-paired difference to SFT, by hand;
    runs without it get no calculator section."""
    runs = []
    for i in range(3):
        run = _fake_run(tmp_path / f"run{i}", i)
        for s, correct in (("sft", CALC_SFT[i]), ("ppo", CALC_PPO[i])):
            f = run / "eval" / f"{s}.json"
            cache = json.loads(f.read_text())
            cache["calculator"] = {"n": 4, "accuracy": sum(correct) / 4, "right_call": sum(correct[:2]) / 4,
                                   "accuracy_without": 0.0, "correct": correct, "correct_without": [0] * 4}
            f.write_text(json.dumps(cache))
        runs.append(run)
    md, got = seeds_report(runs)
    sft, ppo = got["calculator"]["sft"], got["calculator"]["ppo"]
    assert sft["accuracy"]["values"] == [0.5, 0.75, 0.25] and ppo["accuracy"]["mean"] == pytest.approx(0.75)
    assert ppo["accuracy"]["se"] == pytest.approx(0.25 / math.sqrt(3))
    assert ppo["right_call"]["values"] == [0.5, 0.5, 0.5] and sft["accuracy_without"]["mean"] == 0.0
    assert (sft["mcnemar_vs_without"]["b_only"], sft["mcnemar_vs_without"]["a_only"]) == (6, 0)
    assert sft["mcnemar_vs_without"]["p"] == pytest.approx(2 / 2 ** 6)  # 2 * P(X = 0), X ~ Binomial(6, 1/2)
    assert ppo["vs_sft"]["diff"] == pytest.approx(0.25) and ppo["vs_sft"]["se_diff"] == pytest.approx(0.0)
    assert "vs_sft" not in sft
    assert "## The calculator" in md and "| ppo | 0.750 ± 0.144 | 0.500 ± 0.000 | 0.000 ± 0.000 | p = " in md
    assert md.split("| ppo | 0.750 ± 0.144")[1].split("\n")[0].endswith("| +0.250 ± 0.000 |")
    plain, got_plain = seeds_report([_fake_run(tmp_path / f"plain{i}", i) for i in range(3)])
    assert got_plain["calculator"] == {} and "## The calculator" not in plain


def test_seeds_refuses_runs_that_do_not_pair(tmp_path):
    a, b = _fake_run(tmp_path / "a", 0), _fake_run(tmp_path / "b", 1, sha="other")
    with pytest.raises(ValueError, match=r"held-out prompts differ: .*a answered 4 prompts \(abc123.*b 4 \(other"):
        seeds_report([a, b])
    with pytest.raises(ValueError, match="at least 2 runs"):
        seeds_report([a])
    with pytest.raises(ValueError, match="the same run given more than once"):
        seeds_report([a, tmp_path / "b" / ".." / "a"])
    with pytest.raises(ValueError, match="no held-out evaluation"):
        seeds_report([a, tmp_path])
    (b / "eval" / "ppo.json").write_text(json.dumps({"n": 4, "heldout_accuracy": 0.5}))
    with pytest.raises(ValueError, match=r"ppo\.json: held-out evaluation without gold_score, correct, scores"):
        seeds_report([a, b])


def test_seeds_without_prompt_hashes_reads_each_runs_prompts(tmp_path):
    """Caches written before prompts_sha was kept: each run's tasks/heldout.jsonl says what it answered."""
    rows = _rows()[:4]
    runs = []
    for i, rs in enumerate((rows, rows, rows[::-1])):
        run = _fake_run(tmp_path / f"r{i}", i, sha=None)
        for f in (run / "eval").glob("*.json"):
            f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "prompts_sha"}))
        (run / "tasks").mkdir()
        (run / "tasks" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        runs.append(run)
    _, got = seeds_report(runs[:2])
    assert got["prompts"]["sha"] == prompts_sha(rows)
    with pytest.raises(ValueError, match="held-out prompts differ"):
        seeds_report(runs)


def test_seeds_warns_of_repeated_seeds_and_other_settings(tmp_path):
    a, b = _fake_run(tmp_path / "a", 1), _fake_run(tmp_path / "b", 1)
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["ppo"]["lr"] = 0.1
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    _, got = seeds_report([a, b])
    assert any("used the same seeds" in w for w in got["warnings"])
    assert any("differs from" in w and "ppo.lr" in w for w in got["warnings"])


def test_seeds_pairs_runs_copied_away_from_where_they_ran(tmp_path):
    """A run's files kept elsewhere (docs/results/…) still point at the directory they were written in: those
    paths are the run's own, not a difference of settings; a path outside the run still is one."""
    runs = [_fake_run(tmp_path / "kept" / f"seed{i}", i) for i in range(2)]
    for i, run in enumerate(runs):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["sft"]["data"] = f"runs/x-seed{i}/tasks/sft.jsonl"
        cfg["reward"]["val_data"] = f"runs/x-seed{i}/comparisons_heldout.jsonl"
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert seeds_report(runs)[1]["warnings"] == []
    cfg = yaml.safe_load((runs[1] / "config.yaml").read_text())
    cfg["dpo"]["data"] = "elsewhere/tasks/pairs.jsonl"
    (runs[1] / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert [w for w in seeds_report(runs)[1]["warnings"] if "dpo.data" in w]


def test_seeds_command_writes_the_table(tmp_path):
    import subprocess

    runs = [str(_fake_run(tmp_path / f"run{i}", i)) for i in range(3)]
    out = tmp_path / "t.md"
    r = subprocess.run(cli_cmd("seeds", *runs, "--out", out), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{out}: held-out results over 3 seeds" in r.stdout
    assert out.read_text().startswith("# Held-out results over 3 seeds")
    assert json.loads(out.with_suffix(".json").read_text())["prompts"]["n"] == 4
    r = subprocess.run(cli_cmd("seeds", runs[0], "--out", out), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "at least 2 runs" in r.stderr


def _eval_run(tmp_path):
    """A tiny run with two random one-layer policies (sft, ppo) and _rows() as its held-out prompts ->
    (run, rows, RUN/tasks/heldout.jsonl)."""
    import torch

    from chatfactory.model.gpt import GPT, GPTConfig
    from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
    from conftest import make_run

    run = make_run(tmp_path / "run")
    info = json.loads((run / "sft" / "config.json").read_text())
    torch.manual_seed(1)
    save_checkpoint(run / "ppo", unique_state_dict(GPT(GPTConfig.from_dict(info["model"]))), {"model": info["model"]})
    rows = _rows()
    (run / "tasks").mkdir()
    heldout = run / "tasks" / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run, rows, heldout


def test_evaluate_all_caches_what_the_seeds_table_pairs(tmp_path):
    """evaluate_all on two tiny random policies: each cache holds the per-prompt lengths and the prompts' hash,
    each aligned stage gets its vs_sft record; a cache of other prompts is redone, an older cache (no lengths,
    no hash) is kept and filled in."""
    from chatfactory.eval.heldout import evaluate_all

    run, rows, heldout = _eval_run(tmp_path)
    cfg = load_config("pipeline-tiny", ["pipeline.eval_max_tokens=6", "sft.device=cpu"])
    out = evaluate_all(cfg, run, {"heldout": heldout}, ["sft", "ppo"], log=lambda *_: None)
    cache = {s: json.loads((run / "eval" / f"{s}.json").read_text()) for s in ("sft", "ppo")}
    for s in ("sft", "ppo"):
        assert cache[s]["prompts_sha"] == prompts_sha(rows) and cache[s]["n"] == len(rows)
        assert cache[s]["reply_chars"] == [len(a) for a in cache[s]["replies"]]
    v = out["ppo"]["vs_sft"]
    assert v == versus_sft(cache["ppo"], cache["sft"]) and "vs_sft" not in out["sft"]
    assert v["win_rate"] == out["ppo"]["win_rate_vs_sft"]["win_rate"]
    assert v["mcnemar"]["n"] == len(rows)
    from chatfactory.eval.report import build_json, write_markdown

    rep = build_json(run, {"stages": {}}, out)
    assert rep["ppo"]["vs_sft"] == v and rep["dpo"]["vs_sft"] is None
    assert f"- ppo: mean reply {v['mean_chars']:.1f} characters" in write_markdown(run, rep, out, {}, 0, "rubric")

    stale = dict(cache["ppo"], prompts_sha="other prompts", replies=["stale"] * len(rows))
    (run / "eval" / "ppo.json").write_text(json.dumps(stale))
    older = {k: v for k, v in cache["sft"].items() if k not in ("prompts_sha", "reply_chars")}
    older["replies"] = ["kept"] * len(rows)
    (run / "eval" / "sft.json").write_text(json.dumps(older))
    again = evaluate_all(cfg, run, {"heldout": heldout}, ["sft", "ppo"], log=lambda *_: None)
    assert again["ppo"]["replies"] == cache["ppo"]["replies"]  # redone: the same seed gives the same replies
    assert again["sft"]["replies"] == ["kept"] * len(rows)
    filled = json.loads((run / "eval" / "sft.json").read_text())
    assert filled["reply_chars"] == [4] * len(rows) and filled["prompts_sha"] == prompts_sha(rows)


def test_several_replies_per_prompt_pair_reply_by_reply(tmp_path):
    """pipeline.eval_replies=3: every policy answers each held-out prompt 3 times; the caches run over prompts × 3
    items, reply-major, the first reply of each prompt is the single-reply evaluation's, the report counts
    prompts (not items), and the seeds table refuses to pair runs that sampled different numbers of replies."""
    from chatfactory.eval.heldout import evaluate_all
    from chatfactory.eval.report import build_json, write_markdown

    run, rows, heldout = _eval_run(tmp_path)
    args = ["pipeline.eval_max_tokens=6", "sft.device=cpu", "pipeline.eval_temperature=1.0"]
    one = evaluate_all(load_config("pipeline-tiny", args), run, {"heldout": heldout}, ["sft", "ppo"],
                       log=lambda *_: None)
    cfg = load_config("pipeline-tiny", args + ["pipeline.eval_replies=3"])
    three = evaluate_all(cfg, run, {"heldout": heldout}, ["sft", "ppo"], log=lambda *_: None)
    n = len(rows)
    for s in ("sft", "ppo"):
        e = three[s]
        assert e["n"] == 3 * n and e["replies_per_prompt"] == 3 and len(e["scores"]) == len(e["replies"]) == 3 * n
        assert e["replies"][:n] == one[s]["replies"]  # reply 0 is the single-reply evaluation's
        assert e["replies"][n:2 * n] != e["replies"][:n]  # later replies are new draws
        assert e["heldout_accuracy"] == pytest.approx(sum(e["correct"]) / (3 * n))
    items = rows * 3
    assert three["ppo"]["win_rate_vs_sft"] == win_vs(items, three["ppo"]["replies"], three["sft"]["replies"])
    assert three["ppo"]["vs_sft"]["mcnemar"]["n"] == 3 * n
    rep = build_json(run, {"stages": {}}, three)
    assert rep["heldout_prompts"] == n and rep["replies_per_prompt"] == 3
    assert f"held-out prompts: **{n}** × **3** sampled replies each" in write_markdown(run, rep, three, {}, 0, "r")
    with pytest.raises(ValueError, match=r"pipeline\.eval_replies=0"):
        evaluate_all(load_config("pipeline-tiny", args + ["pipeline.eval_replies=0"]), run, {"heldout": heldout},
                     ["sft"], log=lambda *_: None)

    other = _fake_run(tmp_path / "other", 1, sha=prompts_sha(rows))
    with pytest.raises(ValueError, match=r"sampled 3 replies to each held-out prompt, .*other 1"):
        seeds_report([run, other])
