"""Rejection-sampling fine-tuning (train/rft.py): which answer is kept, learning on the tiny RL world
(builders/rl_world.py: the SFT policy says "blue" about a quarter of the time, the gold rule wants blue),
the reward model choosing where no verifier checks, rounds, and resuming without sampling again."""

import json

import pytest

from builders.rl_world import gold, train_reward_model
from chatfactory.config import Config, RFTConfig
from chatfactory.data.preferences import load_prompts
from chatfactory.store.checkpoint import stage_finished
from chatfactory.store.load import load_model
from chatfactory.train import rft as rft_module
from chatfactory.train.rft import pick_best, run_rft
from chatfactory.train.selection import gold_score


def test_pick_best_keeps_a_passing_ended_clean_answer_with_the_highest_reward():
    row = {"task": "arithmetic", "answer": "7", "messages": [{"role": "user", "content": "What is 3 + 4?"}]}
    texts = ["3 + 4 = 8.", "3 + 4 = 7.", "7.", "3 + 4 = 7 and", "7\ufffd", ""]
    ended = [True, True, True, False, True, True]
    scores = [9.0, 1.0, 2.0, 5.0, 8.0, 7.0]
    verifier = rft_module.load_verifier("correct")
    # the wrong answer (highest reward), the unfinished one, the broken character and the empty reply are out
    assert pick_best(row, texts, ended, scores, verifier) == 2
    assert pick_best(row, texts, ended, [0.0, 3.0, 2.0, 0, 0, 0], verifier) == 1
    # no passing answer: the prompt is skipped, never a wrong demonstration
    assert pick_best(row, ["8.", "9."], [True, True], [1.0, 2.0], verifier) is None
    # small talk: the verifier has no check, the reward model alone chooses
    chat = {"task": "greeting", "messages": [{"role": "user", "content": "Hi!"}]}
    assert pick_best(chat, ["Hello!", "Hi there!"], [True, True], [0.5, 1.5], verifier) == 1
    assert pick_best(chat, ["Hello!", "Hi there!"], [True, True], [0.5, 1.5], None) == 1


def _cfg(root, **kw):
    settings = dict(prompts=str(root / "prompts.jsonl"), reward="", verifier="rl_gold:score", k=4,
                    max_new_tokens=6, batch_prompts=16, steps=30, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2,
                    eval_every=0, ckpt_every=10, val_fraction=0.0, progress=False, device="cpu", seed=5)
    settings.update(kw)
    cfg = Config()
    cfg.rft = RFTConfig(**settings)
    return cfg


@pytest.mark.slow
def test_rft_on_the_verifier_raises_gold_and_resumes_without_sampling(world, monkeypatch):
    """One round, 4 answers per prompt, the verifier "says blue": the kept answers all say blue, and the
    fine-tuned policy says it on held-out things far more often than SFT's quarter. A rerun reuses the kept
    answers (sampling again would fail here)."""
    root, run, tok = world
    held = load_prompts(str(root / "heldout.jsonl")) * 4
    before = gold_score(load_model(run / "sft")[0], tok, held, gold, max_new_tokens=6, seed=1)
    res = run_rft(_cfg(root), run)
    kept = [json.loads(line) for line in open(run / "rft" / "round1" / "answers.jsonl")]
    assert kept and all("blue" in r["messages"][-1]["content"] and r["verified"] == 1.0 for r in kept)
    assert res["kept"] == len(kept) and res["rounds"][0]["prompts"] == 16
    after = gold_score(load_model(run / "rft")[0], tok, held, gold, max_new_tokens=6, seed=1)
    print(f"rft on the verifier: gold {before:.3f} -> {after:.3f}; kept {len(kept)} of 16")
    assert before < 0.5 and after > before + 0.4

    def no_sampling(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(rft_module, "best_answers", no_sampling)
    run_rft(_cfg(root), run)  # finished: the answers and the weights are reused


@pytest.mark.slow
def test_rft_rounds_and_the_reward_model_choosing(tmp_path):
    """No verifier: a reward model trained on "blue beats the others" chooses among 8 answers; two rounds,
    the second sampling from the first. Each round keeps blue far more often than a random draw would."""
    from builders.rl_world import build_world

    root = tmp_path / "w"
    run, tok = build_world(root)
    train_reward_model(root, run, tok)
    res = run_rft(_cfg(root, reward="reward", verifier="", rounds=2, steps=15, k=8), run)
    assert stage_finished(run / "rft" / "round1") and stage_finished(run / "rft")
    for r in (1, 2):
        rows = map(json.loads, open(run / "rft" / f"round{r}" / "answers.jsonl"))
        kept = [row["messages"][-1]["content"] for row in rows]
        share = sum("blue" in k for k in kept) / len(kept)
        print(f"round {r}: {share:.2f} of the kept answers say blue")
        # a random one of 8 says blue ~0.25 of the time; the best of 8 does whenever any does (~0.9 from SFT)
        assert share > 0.6
    assert [x["round"] for x in res["rounds"]] == [1, 2]
