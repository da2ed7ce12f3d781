"""Comparisons data and the reward model: parsing (both formats, bad rows), batching, the scalar head
read at the last real token, and a learning test against a programmatic gold labeler (the good/bad topics
task of tests/builders/preferences.py; the ``sft_run`` fixture holds its SFT'd policy)."""
import json

import pytest
import torch

from builders import write_jsonl
from builders.preferences import (
    HELD_OUT_TOPICS,
    TOPICS,
    TRAIN_TOPICS,
    comparison_rows,
    gold_score,
    make_tokenizer,
    prompt_of,
)
from chatfactory.config import Config, RewardConfig
from chatfactory.data.preferences import (
    PairBatches,
    collate,
    encode_pairs,
    fit,
    load_comparisons,
    load_prompts,
    parse_hh_transcript,
    read_comparisons,
)
from chatfactory.formats.jsonl import DataError
from chatfactory.model.gpt import GPTConfig
from chatfactory.text.tokenizer import Tokenizer

ROOT_DIR = __import__("pathlib").Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- data
def test_hh_transcripts_and_comparisons_parse(tmp_path):
    hh = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: Blue.",
          "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: No."}
    ours = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "chosen": "Hello.", "rejected": "Go away."}
    p = write_jsonl(tmp_path / "c.jsonl", [hh, ours, {"prompt": "Just a string", "chosen": "a", "rejected": "b"}])
    pairs = load_comparisons(str(p))
    assert [m["role"] for m in pairs[0].prompt] == ["user", "assistant", "user"]
    assert pairs[0].prompt[2]["content"] == "Name a color." and (pairs[0].chosen, pairs[0].rejected) == ("Blue.", "No.")
    assert pairs[1].prompt == ours["prompt"] and pairs[1].chosen == "Hello."
    assert pairs[2].prompt == [{"role": "user", "content": "Just a string"}]
    assert parse_hh_transcript("\n\nHuman: a\n\nAssistant: b") == [{"role": "user", "content": "a"},
                                                                   {"role": "assistant", "content": "b"}]


@pytest.mark.parametrize("row, message", [
    ({"chosen": "x"}, "needs a string 'rejected'"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x",
      "rejected": "y"}, "must end in a user turn"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "x", "rejected": "y"}, "unknown role"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"}, "differ before"),
    ({"chosen": "no transcript here", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "not an HH transcript"),
])
def test_bad_comparison_rows_name_file_and_line(tmp_path, row, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    p = write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}"):
        load_comparisons(str(p))
    pairs, skipped = read_comparisons(str(p), skip_bad=True)
    assert len(pairs) == 2 and skipped == 1


def test_prompts_loader_keeps_extra_keys_and_rejects_bad_rows(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"messages": prompt_of("cats"), "answer": "good"}])
    assert load_prompts(str(p))[0]["answer"] == "good"
    bad = write_jsonl(tmp_path / "q.jsonl", [{"messages": prompt_of("cats")},
                                             {"messages": prompt_of("dogs") + [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match=r"q\.jsonl:2: .*must end in a user turn"):
        load_prompts(str(bad))
    (tmp_path / "r.jsonl").write_text('{"messages": []}\n{oops\n')
    with pytest.raises(DataError, match=r"r\.jsonl:1"):
        load_prompts(str(tmp_path / "r.jsonl"))


def test_fit_keeps_the_end_of_the_prompt_and_the_start_of_the_answer():
    assert fit([1, 2, 3], [4, 5], 10) == ([1, 2, 3], [4, 5])
    assert fit([1, 2, 3, 4, 5, 6], [7, 8], 6) == ([3, 4, 5, 6], [7, 8])
    assert fit([1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11], 8) == ([3, 4], [5, 6, 7, 8, 9, 10])  # prompt keeps 8//4


def test_batches_are_a_pure_function_of_the_step_and_ranks_split_the_global_batch(tmp_path):
    tok = make_tokenizer(tmp_path / "tok.json")
    pairs = load_comparisons(str(write_jsonl(tmp_path / "c.jsonl", comparison_rows(20, TOPICS, 0))))
    enc = encode_pairs(tok, pairs, 64)
    a = PairBatches(enc, 4, seed=3, pad_id=tok.pad_id)
    b = PairBatches(enc, 4, seed=3, pad_id=tok.pad_id)
    late = a.micro_batch(7, 1, 2)  # step 7 first, then step 0: no hidden state carries over
    assert torch.equal(late["idx"], b.micro_batch(7, 1, 2)["idx"])
    assert torch.equal(a.micro_batch(0, 0, 2)["idx"], b.micro_batch(0, 0, 2)["idx"])
    one = PairBatches(enc, 8, seed=3, pad_id=tok.pad_id).micro_batch(2, 0, 1)
    r0, r1 = a.micro_batch(2, 0, 1, rank=0, world=2), a.micro_batch(2, 0, 1, rank=1, world=2)
    def chosen(b):
        return [tuple(r[r != tok.pad_id].tolist()) for r in b["idx"][: len(b["idx"]) // 2]]
    assert chosen(one) == chosen(r0) + chosen(r1)  # two ranks of 4 = one process of 8
    # an epoch visits every pair exactly once
    seen = [tuple(r[r != tok.pad_id].tolist()) for s in range(5) for r in a.micro_batch(s, 0, 1)["idx"][:4]]
    assert sorted(seen) == sorted(tuple(e.chosen) for e in enc)
    # layout: chosen rows then rejected rows, last = last real token = <|end|>, mask on answer + end
    row = one["idx"][0]
    assert row[one["last"][0]] == tok.end_id and (one["last"][0] + 1 == len(row)
                                                  or row[one["last"][0] + 1] == tok.pad_id)
    ans = row[one["answer_mask"][0]].tolist()
    assert tok.decode(ans[:-1]).startswith(TOPICS[0][:0]) and ans[-1] == tok.end_id
    assert row[one["answer_mask"][0].nonzero()[0, 0] - 1] == tok.special["<|assistant|>"]


# ---------------------------------------------------------------- model
def test_reward_head_init_and_score_at_last_real_token():
    from chatfactory.train.reward import RewardModel

    torch.manual_seed(0)
    cfg = GPTConfig(depth=1, n_embd=64, n_head=2, vocab_size=300, block_size=32)
    rm = RewardModel(cfg).eval()
    assert rm.backbone.lm_head is None and not any("lm_head" in k for k in rm.state_dict())
    assert rm.head.bias.item() == 0.0 and abs(rm.head.weight.std().item() - 1 / 65 ** 0.5) < 0.04
    a, b = torch.randint(0, 300, (1, 7)), torch.randint(0, 300, (1, 12))
    solo = [rm.score(a, torch.tensor([6])), rm.score(b, torch.tensor([11]))]
    padded = torch.full((2, 12), 5)
    padded[0, :7], padded[1] = a[0], b[0]
    both = rm(padded, torch.tensor([6, 11]))
    torch.testing.assert_close(both, torch.cat(solo), atol=1e-5, rtol=0)
    assert torch.allclose(rm.values(a)[0, -1], solo[0][0], atol=1e-6)
    # a different token after the last real one changes nothing; a different last token does
    padded2 = padded.clone()
    padded2[0, 7:] = 9
    assert torch.allclose(rm(padded2, torch.tensor([6, 11])), both, atol=1e-6)
    padded2[0, 6] = (padded2[0, 6] + 1) % 300
    assert not torch.allclose(rm(padded2, torch.tensor([6, 11]))[0], both[0])


def test_bradley_terry_loss_by_hand():
    from chatfactory.train.reward import bradley_terry

    loss, margin = bradley_terry(torch.tensor([2.0, 0.0, 1.0, 0.0]))  # chosen 2, 0; rejected 1, 0
    assert margin.tolist() == [1.0, 0.0]
    expected = (-torch.log(torch.sigmoid(torch.tensor(1.0))) + torch.log(torch.tensor(2.0))) / 2
    assert abs(loss.item() - expected.item()) < 1e-6


# ---------------------------------------------------------------- learning
@pytest.mark.slow
def test_reward_model_learns_the_gold_rule(sft_run, tmp_path):
    from chatfactory.train.reward import load_reward_model, run_reward

    run, tok = sft_run
    train_f = write_jsonl(tmp_path / "train.jsonl", comparison_rows(480, TRAIN_TOPICS, 1))
    val_f = write_jsonl(tmp_path / "val.jsonl", comparison_rows(120, HELD_OUT_TOPICS, 2))
    cfg = Config(reward=RewardConfig(data=str(train_f), val_data=str(val_f), batch_size=16, seq_len=64, lr=1e-3,
                                     eval_every=5, eval_batches=0, progress=False, device="cpu"))
    res = run_reward(cfg, run)
    rows = [json.loads(x) for x in open(run / "reward" / "metrics.jsonl")]
    evals = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [5, 10, 15, 20, 25, 30]  # one epoch of 480 pairs, 16 a step
    assert res["val_accuracy"] >= 0.85, evals  # held-out topics: chance is 0.5
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"] and evals[-1]["val_margin"] > 1.0
    # the bias centres the scores of the comparison answers on zero; chosen score above rejected
    rm = load_reward_model(run / "reward")
    info = json.loads((run / "reward" / "config.json").read_text())
    assert info["kind"] == "reward" and info["model"]["n_embd"] == 64
    pairs = encode_pairs(tok, load_comparisons(str(val_f)), 64)
    b = collate(pairs, tok.pad_id)
    with torch.no_grad():
        s = rm(b["idx"], b["last"])
    assert abs(s.mean().item()) < 0.5 * s.std().item() and (s[:120] > s[120:]).float().mean() >= 0.85


# ---------------------------------------------------------------- comparisons command
def test_load_scorer_and_pick_pairs():
    from chatfactory.data.comparisons import pick_pairs
    from chatfactory.data.scorer import load_scorer

    assert load_scorer("builders.preferences:gold_score") is gold_score
    for spec, msg in [("nocolon", "must look like"), ("no_such_mod_xyz:f", "cannot import"),
                      ("builders.preferences:nope", "has no 'nope'"),
                      ("builders.preferences:TOPICS", "not a function")]:
        with pytest.raises(ValueError, match=msg):
            load_scorer(spec)
    answers, scores = ["a", "b", "c", "b"], [0.5, 1.0, 0.0, 1.0]
    assert pick_pairs(answers, scores, "best_worst") == [(1, 2)]
    assert pick_pairs(answers, scores, "all") == [(0, 2), (1, 0), (1, 2)]  # the duplicate "b" adds nothing
    assert pick_pairs(answers, [0.3] * 4, "best_worst") == [] == pick_pairs(answers, [0.3] * 4, "all")
    with pytest.raises(ValueError, match="best_worst"):
        pick_pairs(answers, scores, "most")


def test_mismatched_answers_come_from_prompts_of_another_task():
    from chatfactory.data.comparisons import add_mismatched

    rows = [{"messages": [], "task": t} for t in ("add", "add", "greet", "sort")]
    samples = [[f"{i}.{j}" for j in range(3)] for i in range(4)]
    out = add_mismatched(rows, samples, 2, seed=7)
    assert out == add_mismatched(rows, samples, 2, seed=7)  # seeded: a function of the inputs
    for i, (row, answers) in enumerate(zip(rows, out)):
        assert answers[:3] == samples[i] and len(answers) == 5
        owners = [int(a.split(".")[0]) for a in answers[3:]]
        assert len(set(owners)) == 2 and all(rows[o]["task"] != row["task"] for o in owners)
    untagged = [{"messages": []} for _ in range(3)]  # rows without tasks: any other prompt
    assert all(int(a.split(".")[0]) != i for i, ans in enumerate(add_mismatched(untagged, samples[:3], 1, 0))
               for a in ans[3:])


def test_max_pairs_takes_a_seeded_subset_spanning_the_file(tmp_path):
    import re

    from chatfactory.data.preferences import pair_data

    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "yes", "rejected": "no"} for i in range(200)]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer.train([" ".join(f"q{i}" for i in range(200)) + " yes no"] * 5, vocab_size=400, min_frequency=1)
    pc = RewardConfig(data=str(path), max_pairs=50, val_fraction=0.0, seq_len=32)
    picked = [int(re.search(r"q(\d+)", tok.decode(p.chosen)).group(1)) for p in pair_data(pc, tok)[0]]
    assert len(set(picked)) == 50 and picked == [int(re.search(r"q(\d+)", tok.decode(p.chosen)).group(1))
                                                 for p in pair_data(pc, tok)[0]]
    assert max(picked) >= 100  # not the head of the file (q0 … q49)


@pytest.mark.slow
def test_comparisons_then_reward_through_the_cli(sft_run, tmp_path):
    """The InstructGPT loop's data step: K samples of the SFT policy per prompt, labeled by the gold rule,
    then a reward model trained on them — both through the real CLI."""
    import os
    import shutil
    import subprocess

    from conftest import ROOT, cli_cmd

    src, tok = sft_run
    run = tmp_path / "run"  # a fresh run holding only the tokenizer and the SFT policy
    shutil.copytree(src / "sft", run / "sft")
    shutil.copy(src / "tokenizer.json", run / "tokenizer.json")
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"messages": prompt_of(t), "topic": t} for t in TRAIN_TOPICS * 4])
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "pairs.jsonl"
    r = subprocess.run(cli_cmd("comparisons", "--run", run, "--prompts", prompts, "--k", 4, "--out", out,
                               "comparisons.labeler=builders.preferences:gold_score", "comparisons.max_tokens=16"),
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    # 4 samples half good, half bad: most of the 48 prompts give a pair, and every pair is right
    assert 30 <= len(rows) <= 48
    assert all(gold_score({}, x["chosen"]) == 1.0 > gold_score({}, x["rejected"]) for x in rows)
    assert all(x["prompt"][0]["content"].startswith("tell me about") for x in rows)
    pairs = load_comparisons(str(out))  # the written file reads back in the comparisons format
    assert len(pairs) == len(rows)
    r = subprocess.run(cli_cmd("reward", "--config", "tiny", "--out", run, f"reward.data={out}",
                               "reward.val_fraction=0.2", "reward.batch_size=8", "reward.seq_len=64", "reward.lr=1e-3",
                               "reward.epochs=4", "reward.progress=false", "reward.device=cpu"),
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    acc = float(r.stdout.split("val_accuracy=")[1].split()[0])
    print(r.stdout)
    assert acc >= 0.75, r.stdout  # 9 held-out pairs of the policy's own answers
    # a bad labeler spec is a clear error, not a traceback
    r = subprocess.run(cli_cmd("comparisons", "--run", run, "--prompts", prompts, "comparisons.labeler=nope"),
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "must look like 'package.module:function'" in r.stderr


def copies_of(src, tmp_path, names) -> list:
    """One run directory per name, each holding ``src``'s SFT stage and tokenizer."""
    import shutil

    runs = []
    for name in names:
        run = tmp_path / name
        shutil.copytree(src / "sft", run / "sft")
        shutil.copy(src / "tokenizer.json", run / "tokenizer.json")
        runs.append(run)
    return runs


@pytest.mark.slow
def test_reward_resumes_exactly_after_an_interruption(sft_run, tmp_path, monkeypatch):
    """Killed mid-run (here: an exception at step 9, after the step-8 checkpoint) and run again, the reward
    model ends with exactly the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    from chatfactory.train import reward as R

    src, tok = sft_run
    data = write_jsonl(tmp_path / "c.jsonl", comparison_rows(200, TRAIN_TOPICS, 5))
    cfg = Config(reward=RewardConfig(data=str(data), steps=12, batch_size=8, seq_len=64, lr=1e-3, ckpt_every=4,
                                     eval_every=6, progress=False, device="cpu"))
    runs = copies_of(src, tmp_path, ("straight", "interrupted"))
    R.run_reward(cfg, runs[0])
    real = R.RewardStage.micro_batch

    def dies_at_step_9(self, step, micro, rank, world):
        if step == 9:
            raise KeyboardInterrupt("killed")
        return real(self, step, micro, rank, world)

    monkeypatch.setattr(R.RewardStage, "micro_batch", dies_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        R.run_reward(cfg, runs[1])
    assert json.loads((runs[1] / "reward" / "config.json").read_text())["step"] == 8
    monkeypatch.setattr(R.RewardStage, "micro_batch", real)
    R.run_reward(cfg, runs[1])
    a, b = (load_file(str(r / "reward" / "model.safetensors")) for r in runs)
    # bitwise, same host: the resumed run repeats the uninterrupted one's operations
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [[json.loads(x) for x in open(r / "reward" / "metrics.jsonl")] for r in runs]
    assert [m["loss"] for m in metrics[0] if "loss" in m] == [m["loss"] for m in metrics[1] if "loss" in m]
    # a finished run asked again changes nothing
    R.run_reward(cfg, runs[1])
    c = load_file(str(runs[1] / "reward" / "model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)  # bitwise, any host: nothing was trained or written again


@pytest.mark.slow
def test_a_crash_before_the_calibration_leaves_the_stage_unfinished(sft_run, tmp_path, monkeypatch):
    """The bias shift is part of the finished reward model: killed after training but before the shift is
    saved, the stage is not marked finished (later stages would use an uncentred model); run again, it
    calibrates once and ends exactly as an uninterrupted run, and a third run shifts nothing."""
    from safetensors.torch import load_file

    from chatfactory.train import reward as R

    src, tok = sft_run
    data = write_jsonl(tmp_path / "c.jsonl", comparison_rows(64, TRAIN_TOPICS, 6))
    cfg = Config(reward=RewardConfig(data=str(data), steps=4, batch_size=8, seq_len=64, lr=1e-3, eval_every=0,
                                     val_fraction=0.0, calib_pairs=16, progress=False, device="cpu"))
    runs = copies_of(src, tmp_path, ("straight", "crashed"))
    R.run_reward(cfg, runs[0])
    real, calls = R.mean_score, []

    def killed(*a, **k):
        raise KeyboardInterrupt("killed before the calibration was saved")

    monkeypatch.setattr(R, "mean_score", killed)
    with pytest.raises(KeyboardInterrupt):
        R.run_reward(cfg, runs[1])
    info = json.loads((runs[1] / "reward" / "config.json").read_text())
    assert info["step"] == 4 and not info["finished"] and "bias_shift" not in info

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(R, "mean_score", counted)
    res = R.run_reward(cfg, runs[1])
    infos = [json.loads((r / "reward" / "config.json").read_text()) for r in runs]
    assert calls == [1] and infos[1]["finished"] and infos[1]["kind"] == "reward"
    assert infos[1]["bias_shift"] == infos[0]["bias_shift"] == res["bias_shift"] != 0.0  # same host: same operations
    a, b = (load_file(str(r / "reward" / "model.safetensors")) for r in runs)
    # shifted once, as uninterrupted (bitwise, same host: the same operations in the same order)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = R.run_reward(cfg, runs[1])  # finished: nothing to train, nothing to shift
    assert calls == [1] and res["bias_shift"] == infos[0]["bias_shift"]
    c = load_file(str(runs[1] / "reward" / "model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)  # bitwise, any host: the finished file was left alone


@pytest.mark.slow
def test_hh_rlhf_preset_reads_every_split(shared_data, sft_run, tmp_path):
    """The hh-rlhf-small preset's comparisons: the four HH-RLHF splits as they are (a few cut-off rows skipped
    and counted), and a reward-model run on a small slice of them."""
    import shutil

    from chatfactory.config import load_config
    from chatfactory.train.reward import run_reward

    cfg = load_config("hh-rlhf-small")
    assert cfg.reward.skip_bad and load_config("hh-rlhf").reward.skip_bad  # the HH files hold a few cut-off rows
    pairs, skipped = read_comparisons(str(ROOT_DIR / cfg.reward.data), skip_bad=True)
    assert len(pairs) > 7500 and 0 < skipped < 0.01 * len(pairs)
    assert all(p.prompt[-1]["role"] == "user" and p.chosen != p.rejected for p in pairs[:50])
    src, tok = sft_run
    run = tmp_path / "run"
    shutil.copytree(src / "sft", run / "sft")
    shutil.copy(src / "tokenizer.json", run / "tokenizer.json")
    cfg = load_config("hh-rlhf-small", [f"reward.data={ROOT_DIR / cfg.reward.data}", "reward.max_pairs=40",
                                  "reward.seq_len=64", "reward.batch_size=4", "reward.val_fraction=0.2",
                                  "reward.progress=false", "reward.device=cpu", "reward.calib_pairs=8"])
    res = run_reward(cfg, run)
    assert json.loads((run / "reward" / "config.json").read_text())["step"] == 8  # 32 train pairs, 4 a step
    # the figures it reports are the saved model's on the 8 held-out pairs of the slice, scored here again
    # (the calibration shifts every score alike: margins, so accuracy and loss, are as at the last evaluation)
    from chatfactory.data.preferences import pair_data
    from chatfactory.train.pairs import pair_right
    from chatfactory.train.reward import load_reward_model

    _, val, _ = pair_data(cfg.reward, tok)
    b = collate(val, tok.pad_id)
    with torch.no_grad():
        s = load_reward_model(run / "reward")(b["idx"], b["last"])
    margin = s[: len(val)] - s[len(val):]
    assert len(val) == 8 and margin.abs().min() > 0  # (a model that scores every answer alike has margins 0)
    assert res["val_accuracy"] == pytest.approx(pair_right(margin).mean().item(), abs=1e-6)
    assert res["val_loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margin).mean().item(), abs=1e-4)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(sft_run, tmp_path):
    """Two processes (gloo), each taking its slice of the global batch of pairs, train like one process
    accumulating the same two micro-batches: same losses, same held-out metrics. (The reward model drops
    the backbone's LM head: DDP would refuse a parameter that never gets a gradient.)"""
    import os
    import shutil
    import subprocess
    import sys

    from chatfactory.config import load_config
    from chatfactory.train.reward import run_reward

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    src, _ = sft_run
    data = write_jsonl(tmp_path / "c.jsonl", comparison_rows(96, TRAIN_TOPICS, 3))
    common = [f"reward.data={data}", "reward.steps=6", "reward.batch_size=4", "reward.seq_len=64", "reward.lr=1e-3",
              "reward.eval_every=3", "reward.progress=false", "reward.device=cpu", "reward.val_fraction=0.25"]
    runs = {}
    for name in ("one", "two"):
        runs[name] = tmp_path / name
        shutil.copytree(src / "sft", runs[name] / "sft")
        shutil.copy(src / "tokenizer.json", runs[name] / "tokenizer.json")
    run_reward(load_config("tiny", common + ["reward.grad_accum=2"]), runs["one"])
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "chatfactory.cli", "reward", "--config",
                        "tiny", "--out", str(runs["two"]), *common], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = ([json.loads(x) for x in open(runs[n] / "reward" / "metrics.jsonl")] for n in ("one", "two"))
    assert [sorted(r) for r in m1] == [sorted(r) for r in m2] and len([r for r in m1 if "loss" in r]) == 6
    for a, b in zip(m1, m2):
        for k in a:
            if k.startswith("val_") or k == "loss":
                assert abs(a[k] - b[k]) < 2e-3, (k, a, b)
    evals = [r["val_loss"] for r in m1 if "val_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]  # and it learned something
