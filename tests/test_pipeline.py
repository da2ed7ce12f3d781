"""`chatfactory run` (pipeline.py, eval/heldout.py, eval/report.py): the whole pipeline end to end on the
tiny preset, its report, resume by skipping finished stages, what it does when a stage is missing, and
the report's account of what the dev split chose."""

import dataclasses
import json
import subprocess
import time

import pytest

from chatfactory import pipeline, stages
from chatfactory.config import load_config
from chatfactory.store.checkpoint import stage_finished
from chatfactory.store.files import CheckpointError
from conftest import ROOT, cli_cmd

REPORT_KEYS = ["total_seconds", "pretrain.val_bpb", "base.heldout_accuracy", "sft.heldout_accuracy",
               "reward.heldout_accuracy", "ppo.heldout_accuracy", "ppo.win_rate_vs_sft", "ppo.kl",
               "dpo.heldout_accuracy", "dpo.win_rate_vs_sft"]


def dig(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


def run_cli(*args, timeout=600):
    return subprocess.run(cli_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def win_rate_of(wins_ties_losses) -> float:
    """A win rate from its counts: wins, and ties as half a win, over all the prompts."""
    wins, ties, losses = wins_ties_losses
    return (wins + 0.5 * ties) / (wins + ties + losses)


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    r = run_cli("run", "--config", "pipeline-tiny", "--out", out)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "chatfactory chat --run" in r.stdout

    rep = json.loads((out / "report.json").read_text())
    for key in REPORT_KEYS:
        v = dig(rep, key)
        assert isinstance(v, float), f"report.json {key} = {v!r}"
    assert rep["heldout_prompts"] == 24
    # the total is the sum of the times the ledger kept for each step (the report's own comes after it), each
    # stage's line is its own, and together they are the run's wall-clock time less the process's start
    timed = {k: v["seconds"] for k, v in json.loads((out / "pipeline.json").read_text())["stages"].items()
             if k != "report"}
    assert rep["total_seconds"] == pytest.approx(sum(timed.values()), abs=0.051)
    for s in ("pretrain", "sft", "comparisons", "reward", "ppo", "dpo", "eval"):
        assert rep[s]["seconds"] == pytest.approx(timed[s], abs=0.051) and timed[s] > 0, s
    assert 0.5 * wall < rep["total_seconds"] < wall, (rep["total_seconds"], wall)
    # PPO kept the iteration that scored best on 8 dev prompts, and the kept policy was scored on dev again
    (choice,) = rep["dev"]["chose"]
    assert rep["dev"]["prompts"] == 160 and (choice["stage"], choice["what"], choice["n"]) == ("ppo", "iteration", 8)
    assert choice["chose"] in ("1", "2") and set(choice["candidates"]) == {"1", "2"}
    kept = choice["kept"]
    assert kept["n"] == sum(kept["wins_ties_losses"]) == 160
    assert kept["win_rate_vs_sft"] == pytest.approx(win_rate_of(kept["wins_ties_losses"]))
    assert "ppo iteration **" in (out / "report.md").read_text()
    for s in ("pretrain", "sft", "comparisons", "reward", "ppo", "dpo"):
        assert rep[s]["status"] == "done", (s, rep[s]["status"])
    # KL is a Monte-Carlo estimate on 24 replies of a policy that barely moved: near 0, maybe a hair below
    assert sum(rep["ppo"]["wins_ties_losses"]) == 24
    assert rep["ppo"]["win_rate_vs_sft"] == pytest.approx(win_rate_of(rep["ppo"]["wins_ties_losses"]))
    assert -0.1 < rep["ppo"]["kl"] < 50
    # the reward model is scored on held-out pairs after training, with the own-sample pairs apart
    rw, rows = rep["reward"], [json.loads(x) for x in (out / "comparisons_heldout.jsonl").read_text().splitlines()]
    assert rw["heldout_pairs"] == min(2000, len(rows)) and 0 < rw["own_sample_pairs"] < rw["heldout_pairs"]
    assert rw["own_sample_pairs"] == sum(not r.get("mismatched") for r in rows) or len(rows) > 2000
    # an accuracy counts pairs (a tie half): a multiple of 1/2 pair
    halves = 2 * rw["own_sample_accuracy"] * rw["own_sample_pairs"]
    assert halves == pytest.approx(round(halves), abs=1e-6)
    assert f"the {rw['own_sample_pairs']:,} between" in (out / "report.md").read_text()

    md = (out / "report.md").read_text()
    for heading in ("What each stage cost", "Held-out evaluation", "Chosen on the dev split", "Pretraining",
                    "zero-, one- and few-shot", "## SFT", "Reward model", "## PPO", "## DPO", "Sample conversations",
                    "The rubric", "## By language"):
        assert heading in md, heading
    # the bilingual tasks: every figure per language too (12 English and 12 Chinese held-out prompts)
    bl = rep["by_language"]
    assert bl["langs"] == ["en", "zh"] and set(bl["heldout"]) == {"pretrain", "sft", "ppo", "dpo"}
    for lang in ("en", "zh"):
        assert bl["heldout"]["sft"][lang]["n"] == bl["heldout"]["ppo"][lang]["n"] == 12
        assert 0 < bl["tokenizer"][lang]["chars_per_token"] < 10
    # the languages split the overall figures: 12 prompts and 12, the mean; the reward model's pairs, weighted
    for key in ("heldout_accuracy", "win_rate_vs_sft"):
        per = [bl["heldout"]["ppo"][lang][key.removeprefix("heldout_")] for lang in ("en", "zh")]
        assert rep["ppo"][key] == pytest.approx(sum(per) / 2), key
    assert sum(v["pairs"] for v in bl["reward"].values()) == rw["heldout_pairs"]
    assert rw["heldout_accuracy"] == pytest.approx(
        sum(v["pairs"] * v["accuracy"] for v in bl["reward"].values()) / rw["heldout_pairs"])
    assert "| tokenizer: characters per token |" in md and "win rate vs SFT zh" in md
    assert "not run" not in md
    for png in ("losses.png", "ppo.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # every stage's checkpoint exists and loads
    from chatfactory.store.load import load_model
    from chatfactory.train.reward import load_reward_model

    for s in ("pretrain", "sft", "ppo", "dpo"):
        model, info = load_model(out / s)
        assert info.get("finished") is True, s
    assert load_reward_model(out / "reward").head.out_features == 1
    pairs = [json.loads(x) for x in (out / "comparisons.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] and p["prompt"][-1]["role"] == "user" for p in pairs)

    # a run killed after reward: ppo and dpo redo their work, everything before is skipped
    import shutil

    for s in ("ppo", "dpo"):
        shutil.rmtree(out / s)
    (out / "report.md").unlink()
    ledger = json.loads((out / "pipeline.json").read_text())
    ledger["stages"]["ppo"]["seconds"] = 1e6  # time spent on the deleted result: must not count again
    (out / "pipeline.json").write_text(json.dumps(ledger))
    r = run_cli("run", "--config", "pipeline-tiny", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for s in ("pretrain", "sft", "comparisons", "reward"):
        assert f"[run] {s}: finished earlier, skipped" in r.stdout
    assert "[run] ppo ..." in r.stdout and "[run] dpo ..." in r.stdout
    assert "eval sft" not in r.stdout  # cached: the sft checkpoint did not change
    assert (out / "report.md").exists()
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["pretrain"]["val_bpb"] == rep["pretrain"]["val_bpb"]
    assert 0 < rep2["ppo"]["seconds"] < 1e6  # ppo started again from nothing: only its new run counts
    for s in ("pretrain", "sft", "reward"):  # skipped stages keep their time
        assert rep2[s]["seconds"] == rep[s]["seconds"], s
    assert rep2["eval"]["seconds"] > rep["eval"]["seconds"]  # the evaluation's times add up across restarts


def test_missing_stage_is_reported_not_faked(tmp_path, monkeypatch):
    """A stage whose module is absent is marked "not run: … not available" and gets no numbers."""
    missing = dataclasses.replace(stages.BY_NAME["ppo"], entry="chatfactory.train.no_such_ppo:run_ppo")
    monkeypatch.setitem(stages.BY_NAME, "ppo", missing)
    with pytest.raises(stages.NotAvailable, match="ppo not available"):
        stages.entry_point("ppo")
    from chatfactory.eval.report import build_json, write_markdown

    ledger = {"stages": {"ppo": {"status": "not run: ppo not available", "seconds": 0.0}}}
    rep = build_json(tmp_path, ledger, {})
    assert rep["ppo"]["win_rate_vs_sft"] is None and rep["ppo"]["heldout_accuracy"] is None
    assert rep["bars"]["ppo_win_rate"] is None
    md = write_markdown(tmp_path, rep, {}, {}, 2, "rubric")
    assert "not run: ppo not available" in md


def test_the_report_states_what_dev_chose(tmp_path):
    """A stage that chose something on the dev split returns a ``dev_choice`` in its result (kept in
    pipeline.json); report.json lists it under "dev" and report.md says it in a line."""
    from chatfactory.eval.report import build_json, write_markdown
    from chatfactory.train.selection import choose_on_dev

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "dev.jsonl").write_text('{"messages": []}\n' * 3)
    rep = build_json(tmp_path, {"stages": {}}, {})
    assert rep["dev"] == {"prompts": 3, "chose": []}
    assert "Chosen on the dev split (3 prompts" in write_markdown(tmp_path, rep, {}, {}, 2, "rubric")

    scores = {it: {"n": 3, "accuracy": 0.3, "gold_score": g, "win_rate_vs_sft": 0.6}
              for it, g in (("10", 0.5), ("20", 0.7))}
    ledger = {"stages": {"ppo": {"status": "done", "seconds": 1.0,
                                 "result": {"steps": 20, "dev_choice": choose_on_dev("iteration", scores)}}}}
    rep = build_json(tmp_path, ledger, {})
    assert [(c["stage"], c["what"], c["chose"]) for c in rep["dev"]["chose"]] == [("ppo", "iteration", "20")]
    md = write_markdown(tmp_path, rep, {}, {}, 2, "rubric")
    assert "ppo iteration **20** by gold score (accuracy 0.300, gold 0.700, win rate vs SFT 0.600; of 10, 20)" in md


def test_bad_stage_name_and_unfinished_checkpoint(tmp_path):
    cfg = load_config("pipeline-tiny", ["pipeline.stages=pretrain,sfft"])
    with pytest.raises(ValueError, match="unknown stage.*sfft"):
        pipeline.run_pipeline(cfg, tmp_path / "run", log=lambda *_: None)
    assert not stage_finished(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "config.json").write_text(json.dumps({"finished": False}))
    assert not stage_finished(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"finished": True}))
    assert stage_finished(tmp_path)


def test_a_damaged_stage_config_is_named_not_taken_for_unfinished(tmp_path):
    """A config.json cut short or overwritten with bytes is an error naming it, in the pipeline's
    "finished?" check and in chat's choice of stage (it used to fall back silently to another stage)."""
    from chatfactory.inference.chat import last_finished_stage

    for s in ("sft", "ppo"):
        (tmp_path / s).mkdir()
        (tmp_path / s / "model.safetensors").write_bytes(b"x")
        (tmp_path / s / "config.json").write_text(json.dumps({"finished": True, "kind": "gpt"}))
    assert last_finished_stage(tmp_path) == "ppo"
    good = (tmp_path / "ppo" / "config.json").read_bytes()
    for damaged in (good[:len(good) // 2], b"\xca" * 300, b"[1, 2]"):
        (tmp_path / "ppo" / "config.json").write_bytes(damaged)
        for check in (lambda: stage_finished(tmp_path / "ppo"), lambda: last_finished_stage(tmp_path)):
            with pytest.raises(CheckpointError, match=r"ppo/config\.json: corrupt"):
                check()


@pytest.mark.slow
def test_pipeline_from_an_imported_chat_model(tmp_path):
    """pipeline.base: a pretrained chat model (here a small random GGUF with a ChatML template) takes
    pretraining's place; every later stage trains LoRA adapters on it, and the report evaluates the
    imported model itself through its own template."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from builders.gguf_model import write_gguf
    from chatfactory.store.load import load_model
    from chatfactory.text.tokenizer import Tokenizer

    gguf = tmp_path / "base.gguf"
    write_gguf(gguf, "llama", {"token_embd": "Q8_0", "attn_q": "Q4_1"})
    out = tmp_path / "run"
    r = run_cli("run", "--config", "pipeline-tiny", "--out", out, f"pipeline.base={gguf}", "lora.rank=4",
                "pipeline.fewshot_shots=")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    for s in ("pretrain", "sft", "comparisons", "reward", "ppo", "dpo"):
        assert rep[s]["status"] == "done", (s, rep[s]["status"])
    assert rep["pretrain"]["imported"]["source"] == str(gguf) and isinstance(rep["base"]["heldout_accuracy"], float)
    md = (out / "report.md").read_text()
    assert "imported, not pretrained here" in md and "base (imported, its own chat template)" in md
    tok = Tokenizer.load(out / "tokenizer.json")
    assert tok.chat_config["eos_token"] == "<|im_end|>"  # the run carries the model's own template
    base, _ = load_model(out / "pretrain")
    for s in ("sft", "reward", "ppo", "dpo"):
        info = json.loads((out / s / "config.json").read_text())
        assert info["lora"]["rank"] == 4, s  # adapters trained, not the whole model
    sft, _ = load_model(out / "sft")  # merged for use: the same architecture, moved weights
    assert sft.cfg == base.cfg and any((a != b).any()
                                       for a, b in zip(sft.state_dict().values(), base.state_dict().values()))


def test_a_resumed_run_records_the_imported_model_not_the_presets(tmp_path):
    """RUN/config.yaml names the model the run trains: after a resume that skips the finished import too (it
    once fell back to the preset's placeholder model section, a 4-layer model the run never had)."""
    pytest.importorskip("gguf")
    from builders.gguf_model import write_gguf

    gguf = tmp_path / "base.gguf"
    write_gguf(gguf, "llama", {"token_embd": "Q8_0", "attn_q": "Q4_1"})
    out = tmp_path / "run"
    cfg = load_config("pipeline-tiny", [f"pipeline.base={gguf}", "pipeline.stages=pretrain", "pipeline.heldout=2",
                                        "pipeline.fewshot_shots="])
    imported = None
    for _ in range(2):  # the import, then a resume that skips it
        pipeline.run_pipeline(cfg, out, log=lambda *_: None)
        saved = load_config(str(out / "config.yaml")).model
        imported = imported or json.loads((out / "pretrain" / "config.json").read_text())["model"]
        assert dataclasses.asdict(saved) == imported
    assert imported != dataclasses.asdict(cfg.model)  # the preset's section differs: the check can fail


def test_constraint_prompts_pipeline_as_smollm2_if_runs_it(tmp_path):
    """The shape of configs/smollm2-if.yaml on the tiny model: comparisons sampled from pretraining on the
    constraint prompts and labelled by the constraint checkers, DPO from pretraining on them, IFEval (here the
    run's own held-back split in IFEval's format) and bits per byte on held-out text (only the rows of its
    validation split) for both stages, all in the report."""
    from chatfactory.data.constraints import follows
    from chatfactory.formats.jsonl import read_jsonl

    text = tmp_path / "stories.jsonl"
    text.write_text("".join(json.dumps({"text": f"Story {i}: the cat sat on the mat and looked at the sun.",
                                        "split": "validation" if i % 2 else "train"}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    cfg = load_config("pipeline-tiny", [
        "pipeline.stages=pretrain,comparisons,dpo", "pipeline.if_prompts=24", "pipeline.if_dev=6",
        "comparisons.stage=pretrain", "comparisons.labeler=chatfactory.data.verifiers:constraints_fraction",
        "comparisons.k=4", "comparisons.pairs=all", "comparisons.mismatched=0", "dpo.init_from=pretrain",
        "pipeline.ifeval=pretrain,dpo", f"pipeline.ifeval_data={out / 'tasks' / 'if_dev_heldback.jsonl'}",
        "pipeline.ifeval_max_tokens=8", f"pipeline.bpb_text={text}", "pipeline.bpb_tokens=4096",
        "pipeline.fewshot_shots=", "pipeline.heldout=8", "model.block_size=512"])
    rep = pipeline.run_pipeline(cfg, out, log=lambda *_: None)
    assert [rep[s]["status"] for s in ("pretrain", "comparisons", "dpo")] == ["done"] * 3
    rows = {r["prompt"]: r for _, r in read_jsonl(out / "tasks" / "if_train.jsonl")}
    pairs = [p for _, p in read_jsonl(out / "comparisons.jsonl")]
    assert pairs and len(rows) == 24
    for p in pairs[:10]:  # every pair is on a training prompt, the chosen reply following more of its constraints
        row = rows[p["prompt"][-1]["content"]]
        assert sum(follows(row, p["chosen"], loose=True)) > sum(follows(row, p["rejected"], loose=True))
    assert all(p["prompt"][-1]["content"] not in rows for _, p in read_jsonl(out / "comparisons_heldout.jsonl"))
    assert list(rep["ifeval"]) == ["pretrain", "dpo"] and "vs" in rep["ifeval"]["dpo"]
    assert rep["ifeval"]["pretrain"]["groups"]["trained"]["n"] == 0  # the held-back split: held-back types only
    bpb = rep["bpb"]
    assert list(bpb) == ["pretrain", "dpo"] and bpb["pretrain"]["change"] == 0.0
    assert 0 < bpb["dpo"]["bpb"]
    assert bpb["dpo"]["change"] == pytest.approx(bpb["dpo"]["bpb"] / bpb["pretrain"]["bpb"] - 1)
    md = (out / "report.md").read_text()
    assert "## Bits per byte on held-out text" in md and "## IFEval" in md
    cached = json.loads((out / "eval" / "dpo" / "bpb.json").read_text())
    assert cached["result"]["bpb"] == bpb["dpo"]["bpb"] and cached["settings"]["split"] == "validation"
