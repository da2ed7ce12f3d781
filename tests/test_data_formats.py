"""The data formats people bring (issue 27): ShareGPT and OpenAI content parts for SFT, TRL's conversational
preferences (explicit and implicit prompt) and UltraFeedback-binarized rows for the reward model and DPO.
Each is written to a real file here, read to the same conversations and ids as the plain messages, and
trains through the stage to the very same losses; bad rows name file:line."""
import copy
import json

import pytest
import torch

from builders import write_jsonl
from builders.preferences import TRAIN_TOPICS, comparison_rows, make_tokenizer
from builders.reverse import make_reverse_run, sft_args
from chatfactory.config import Config, DPOConfig, RewardConfig, load_config
from chatfactory.data.chat import load_conversations
from chatfactory.data.preferences import read_comparisons
from chatfactory.formats.jsonl import DataError
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.train.sft import tokenize_conversations

SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}


def as_sharegpt(row):
    return {"conversations": [{"from": SPEAKER[m["role"]], "value": m["content"]} for m in row["messages"]]}


def as_parts(row):
    """OpenAI's list-of-parts content; a message split in two parts where it has a space (joined by a newline,
    so only where the text has a newline there: here, none, so each stays one part)."""
    return {"messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                         for m in row["messages"]]}


def losses(run_dir, stage):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / stage / "metrics.jsonl").open())
            if "loss" in r]


def test_sharegpt_and_content_parts_train_sft_as_messages_do(tmp_path):
    run, data, tok, _ = make_reverse_run(tmp_path, n=80, n_test=5)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    files = {"messages": data, "sharegpt": write_jsonl(tmp_path / "sharegpt.jsonl", [as_sharegpt(r) for r in rows]),
             "parts": write_jsonl(tmp_path / "parts.jsonl", [as_parts(r) for r in rows])}
    convs = {k: load_conversations(str(p)) for k, p in files.items()}
    assert convs["sharegpt"] == convs["messages"] == convs["parts"] and convs["messages"][0][0]["role"] == "system"
    ids = {k: [[x.tolist() for x in part] for part in tokenize_conversations(c, tok, 64)[:2]]
           for k, c in convs.items()}
    assert ids["sharegpt"] == ids["messages"] == ids["parts"]
    # two parts join with a newline, as one text
    two = load_conversations(str(write_jsonl(tmp_path / "two.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"}]}])))
    assert two[0][0]["content"] == "a\nb"
    from chatfactory.train.sft import run_sft

    got = {}
    for k in ("messages", "sharegpt"):
        out = tmp_path / f"run-{k}"
        out.mkdir()
        for f in ("tokenizer.json",):
            (out / f).write_bytes((run / f).read_bytes())
        run_sft(load_config(None, sft_args(files[k], f"sft.init_from={run / 'pretrain'}", "sft.steps=3",
                                           "sft.eval_every=0", "sft.ckpt_every=0")), out)
        got[k] = losses(out, "sft")
    assert len(got["messages"]) == 3 and got["sharegpt"] == got["messages"]


@pytest.mark.parametrize("bad, match", [
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]},
     r"bad.jsonl:2: conversations\[1\]: unknown speaker 'robot'"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "{}"}]},
     r"bad.jsonl:2: conversations\[1\]: tool turns"),
    ({"conversations": [{"value": "x"}]}, r"bad.jsonl:2: conversations\[0\]: a ShareGPT turn needs"),
    ({"conversations": []}, r"bad.jsonl:2: 'conversations' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "y"}]},
     r"bad.jsonl:2: messages\[0\].content\[0\]: only text parts are read, got a 'image_url' part"),
])
def test_bad_rows_of_the_new_formats_name_file_and_line(tmp_path, bad, match):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with pytest.raises(DataError, match=match):
        load_conversations(str(write_jsonl(tmp_path / "bad.jsonl", [ok, bad])))


def trl_explicit(row):
    return {"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def trl_implicit(row):
    return {"chosen": row["prompt"] + [{"role": "assistant", "content": row["chosen"]}],
            "rejected": row["prompt"] + [{"role": "assistant", "content": row["rejected"]}]}


def ultrafeedback(row):
    out = trl_implicit(row)
    out.update(prompt=row["prompt"][-1]["content"], score_chosen=8.0, score_rejected=3.0,
               messages=out["chosen"], prompt_id="x")
    return out


def test_trl_and_ultrafeedback_preferences_train_the_reward_model_and_dpo_as_before(tmp_path):
    rows = comparison_rows(48, TRAIN_TOPICS, 0)
    rows[0] = copy.deepcopy(rows[0])
    rows[0]["prompt"] = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}] + rows[0]["prompt"]  # a multi-turn prompt
    files = {"plain": write_jsonl(tmp_path / "plain.jsonl", rows)}
    for name, f in (("explicit", trl_explicit), ("implicit", trl_implicit), ("ultrafeedback", ultrafeedback)):
        files[name] = write_jsonl(tmp_path / f"{name}.jsonl", [f(r) for r in rows])
    parts = [{k: copy.deepcopy(v) for k, v in trl_implicit(r).items()} for r in rows]  # (unshared message dicts)
    for r in parts:
        for m in r["chosen"] + r["rejected"]:
            m["content"] = [{"type": "text", "text": m["content"]}]
    files["parts"] = write_jsonl(tmp_path / "parts.jsonl", parts)
    want = [(p.prompt, p.chosen, p.rejected) for p in read_comparisons(str(files["plain"]))[0]]
    for name, path in files.items():
        got = [(p.prompt, p.chosen, p.rejected) for p in read_comparisons(str(path))[0]]
        assert got == want, name
    # through the stages: the same losses, step by step, as the plain format
    from chatfactory.train.dpo import run_dpo
    from chatfactory.train.reward import run_reward

    trained = {}
    for name in ("plain", "implicit", "ultrafeedback"):
        run = tmp_path / f"run-{name}"
        run.mkdir()
        tok = make_tokenizer(run / "tokenizer.json")
        torch.manual_seed(0)
        mcfg = GPTConfig(depth=1, n_embd=64, n_head=2, vocab_size=tok.vocab_size, block_size=64)
        save_checkpoint(run / "sft", unique_state_dict(GPT(mcfg)), {"stage": "sft", "model": mcfg.to_dict()}, None, 0)
        cfg = Config()
        common = dict(data=str(files[name]), steps=2, batch_size=8, seq_len=64, val_fraction=0.0, progress=False,
                      device="cpu", eval_every=0, ckpt_every=0)
        cfg.reward = RewardConfig(**common, calib_pairs=8)
        cfg.dpo = DPOConfig(**common)
        run_reward(cfg, run)
        run_dpo(cfg, run)
        trained[name] = (losses(run, "reward"), losses(run, "dpo"))
    assert len(trained["plain"][0]) == 2 and len(trained["plain"][1]) == 2
    assert trained["implicit"] == trained["plain"] == trained["ultrafeedback"]


@pytest.mark.parametrize("bad, match", [
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     r"bad.jsonl:2: the prompt must end in a user turn \(the conversations share no turns\)"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, r"bad.jsonl:2: 'chosen' must end the conversation"),
    ({"prompt": "other", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     r"bad.jsonl:2: 'prompt' is not the turns 'chosen' and 'rejected' share"),
    ({"chosen": [{"role": "robot", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     r"bad.jsonl:2: chosen\[0\]: unknown role 'robot'"),
])
def test_bad_conversational_pairs_name_file_and_line(tmp_path, bad, match):
    ok = {"prompt": "q", "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match=match):
        read_comparisons(str(write_jsonl(tmp_path / "bad.jsonl", [ok, bad])))
