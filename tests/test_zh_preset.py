"""The zh preset (configs/zh.yaml) and what it added: chat data as pretraining text (``assistant:`` /
``heldout:`` sources), a hashed held-out slice of conversations that SFT never trains on
(``data.chat_holdout``), the Chinese OpenAssistant pairs, and a smoke run of every stage of the preset
on ../shared/data (skipped when the data is absent)."""
import dataclasses
import gzip
import json
import math

import numpy as np
import pytest

from chatfactory.config import DataConfig, load_config
from chatfactory.data.chat import in_holdout, iter_chat_rows, load_conversations
from chatfactory.data.preferences import read_comparisons, split_pairs
from chatfactory.data.sources import iter_texts
from chatfactory.formats.jsonl import DataError
from conftest import ROOT


def write_chats(path, n=300):
    """n conversations with distinct prompts, plus a second answer to each of the first 40 prompts
    (OpenAssistant has several answers per prompt: they must land on the same side of the slice)."""
    rows = [{"messages": [{"role": "user", "content": f"问题{i}：{i}加{i}等于多少？"},
                          {"role": "assistant", "content": f"答案是{2 * i}。"}]} for i in range(n)]
    rows += [{"messages": [{"role": "system", "content": "简短回答。"},
                           {"role": "user", "content": f"问题{i}：{i}加{i}等于多少？"},
                           {"role": "assistant", "content": f"{i}加{i}得{2 * i}。"},
                           {"role": "user", "content": "谢谢"},
                           {"role": "assistant", "content": "不客气！"}]} for i in range(40)]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def answers(conv):
    return "\n\n".join(m["content"] for m in conv if m["role"] == "assistant")


def test_the_heldout_slice_is_exactly_what_sft_leaves_out_and_what_heldout_reads(tmp_path):
    path = write_chats(tmp_path / "chats.jsonl.gz")
    every = [c for _, c in iter_chat_rows(str(path))]
    slice_ = [c for c in every if in_holdout(c, 0.2)]
    # the hash rule holds out about the fraction asked for (340 rows, 300 prompts: 60 +- 3 sigma)
    assert 30 <= len(slice_) <= 95, len(slice_)
    sft = load_conversations(str(path), holdout=0.2)
    assert sft == [c for c in every if c not in slice_] and len(sft) + len(slice_) == len(every)
    # the two answers to one prompt fall on the same side
    def prompt(c):
        return next(m["content"] for m in c if m["role"] == "user")

    side = {prompt(c): c in slice_ for c in every[:300]}
    assert all((c in slice_) == side[prompt(c)] for c in every[300:])
    # text sources: assistant: reads the rest's answers, heldout: the slice's, in file order
    cfg = DataConfig(source=f"assistant:{path}", chat_holdout=0.2)
    assert list(iter_texts(cfg)) == [answers(c) for c in sft]
    assert list(iter_texts(dataclasses.replace(cfg, source=f"heldout:{path}"))) == [answers(c) for c in slice_]
    # without a slice, assistant: reads every answer; a multi-turn conversation is one document
    docs = list(iter_texts(dataclasses.replace(cfg, chat_holdout=0.0)))
    assert len(docs) == len(every) and docs[-1] == "39加39得78。\n\n不客气！"
    # the rule is the content's, not the file's: the same conversations reversed split the same way
    rev = tmp_path / "reversed.jsonl"
    rev.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in reversed(every)),
                   encoding="utf-8")
    assert load_conversations(str(rev), holdout=0.2) == sft[::-1]


@pytest.mark.parametrize("source, holdout, says", [
    ("assistant:", 0.05, "data.source 'assistant:': name the chat data"),
    ("heldout:{chats}", 0.0, "set data.chat_holdout > 0"),
    ("assistant:{chats}", 1.5, "data.chat_holdout=1.5: a held-out fraction must be in [0, 1)"),
    ("assistant:{tmp}/missing.jsonl", 0.05, "missing.jsonl: no such chat data file"),
    ("assistant:{bad}", 0.05, "bad.jsonl:2: conversation has no assistant message"),
])
def test_a_bad_chat_source_is_an_error_naming_it(tmp_path, source, holdout, says):
    chats = write_chats(tmp_path / "chats.jsonl.gz", n=5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "嗨"},
                                            {"role": "assistant", "content": "你好"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "只有问题"}]}) + "\n", encoding="utf-8")
    spec = source.format(chats=chats, tmp=tmp_path, bad=bad)
    with pytest.raises(DataError) as e:
        list(iter_texts(DataConfig(source=spec, chat_holdout=holdout)))
    assert says in str(e.value)
    if source != "assistant:":
        assert f"data.source {spec!r}" in str(e.value)  # which of several comma-separated specs


def test_sft_refuses_a_bad_holdout_fraction(tmp_path):
    with pytest.raises(DataError, match=r"holdout=-0.1: a held-out fraction must be in \[0, 1\)"):
        load_conversations(str(write_chats(tmp_path / "c.jsonl.gz", n=3)), holdout=-0.1)


def test_the_chinese_openassistant_pairs_parse(shared_data):
    pairs, skipped = read_comparisons(str(shared_data / "preference/zh/oasst_zh_pairs.jsonl.gz"))
    assert (len(pairs), skipped) == (775, 0)
    assert all(p.prompt[-1]["role"] == "user" and p.chosen.strip() and p.rejected.strip() for p in pairs)
    # three rows rank two identical answers (a tie no model can break: it scores half)
    assert [p.where.rsplit(":", 1)[1] for p in pairs if p.chosen == p.rejected] == ["145", "300", "592"]
    han = sum(any("\u4e00" <= ch <= "\u9fff" for ch in p.prompt[-1]["content"] + p.chosen) for p in pairs)
    assert han >= 0.95 * len(pairs), han  # Chinese, not a mislabelled English file
    assert pairs[0].prompt == [{"role": "user", "content": "布洛芬和对乙酰氨基酚的区别是？"}]
    assert sum(len(p.prompt) > 1 for p in pairs) > 0  # multi-turn histories come through as messages
    cfg = load_config("zh")
    train, val = split_pairs(pairs, cfg.reward.val_fraction, cfg.reward.seed)
    assert (len(train), len(val)) == (697, 78)


@pytest.mark.slow
def test_the_zh_preset_runs_every_stage_and_never_trains_sft_on_the_slice(shared_data, tmp_path, monkeypatch):
    """The preset's stages, options and data, shrunk to a 1-block model and a few steps. Pretraining
    reads only the OpenAssistant answers (the full text takes minutes to tokenize), with a bigger slice so
    its validation tail has room (the full preset keeps its tail inside its slice too: docs/chinese.md says
    by how much)."""
    import chatfactory.train.sft as sft_mod
    from chatfactory.store.checkpoint import stage_finished
    from chatfactory.text.tokenizer import Tokenizer
    from chatfactory.train.dpo import run_dpo
    from chatfactory.train.pretrain import run_pretrain
    from chatfactory.train.reward import run_reward

    oasst = shared_data / "sft/zh/oasst_zh_messages.jsonl.gz"
    fast = ["model.depth=1", "model.block_size=64", "tokenizer.vocab_size=600",
            f"data.source=assistant:{oasst},heldout:{oasst}", "data.chat_holdout=0.3", "data.val_fraction=0.1",
            "sft.max_rows=1500", "reward.max_pairs=64", "dpo.max_pairs=64"]
    for s in ("pretrain", "sft", "reward", "dpo"):
        fast += [f"{s}.steps=2", f"{s}.seq_len=64", f"{s}.batch_size=4", f"{s}.eval_every=2", f"{s}.eval_batches=1",
                 f"{s}.progress=false", f"{s}.device=cpu"]
    cfg = load_config("zh", fast)
    preset = load_config("zh")
    assert preset.data.chat_holdout == 0.05 and cfg.reward.val_fraction == 0.1
    # the shipped source list names files that exist, held-out slices last (they are the validation tail)
    specs = [s.strip() for s in preset.data.source.split(",")]
    assert all((ROOT / s.split(":", 1)[-1]).is_file() for s in specs), specs
    assert ([s.split(":")[0] for s in specs[-2:]] == ["heldout", "heldout"]
            and not any(s.startswith("heldout:") for s in specs[:-2]))
    run = tmp_path / "zh"
    seen = {}
    real_split = sft_mod.split_conversations

    def spy(convs, val_fraction, seed):
        seen["convs"] = convs
        return real_split(convs, val_fraction, seed)

    monkeypatch.setattr(sft_mod, "split_conversations", spy)
    run_pretrain(cfg, run)
    # SFT's conversations (train and its own validation) are every conversation less the slice, exactly
    sft_mod.run_sft(cfg, run)
    every = [c for _, c in iter_chat_rows(cfg.sft.data)]
    kept = [c for c in every if not in_holdout(c, 0.3)]
    assert len(every) == 20465 + 766 and 0.25 < 1 - len(kept) / len(every) < 0.35
    assert seen["convs"] == kept[:1500]  # sft.max_rows counts what is left after the slice
    # the validation tail of the token stream lies inside the held-out slice (listed last in data.source)
    tok = Tokenizer.load(run / "tokenizer.json")
    held = [c for _, c in iter_chat_rows(str(oasst)) if in_holdout(c, 0.3)]
    held_tokens = sum(len(ids) + 1 for ids in tok.encode_batch([answers(c) for c in held]))
    val = json.loads((run / "data/meta.json").read_text())["val"]["tokens"]
    assert 0 < val <= held_tokens, (val, held_tokens)
    for s, fn in (("reward", run_reward), ("dpo", run_dpo)):
        fn(cfg, run)
        assert stage_finished(run / s)
    logged = {s: [json.loads(line) for line in (run / s / "metrics.jsonl").read_text().splitlines()]
              for s in ("pretrain", "sft", "reward", "dpo")}
    for s, rows in logged.items():
        assert [r["step"] for r in rows if "loss" in r] == [1, 2] and any("val_loss" in r for r in rows), s
        assert all(math.isfinite(v) for r in rows for k, v in r.items() if isinstance(v, float)), s
    # the numbers are the stages' own: a random model's first loss is about ln V (a uniform guess), and DPO's
    # first is ln 2 exactly (the policy is its reference before the first update; any host: the same forward)
    vocab = json.loads((run / "pretrain" / "config.json").read_text())["model"]["vocab_size"]
    assert abs(logged["pretrain"][0]["loss"] - math.log(vocab)) < 0.5, logged["pretrain"][0]
    assert logged["dpo"][0]["loss"] == round(math.log(2), 6)
    acc = [r["val_accuracy"] for r in map(json.loads, (run / "reward/metrics.jsonl").read_text().splitlines())
           if "val_accuracy" in r]
    # every one of the 78 held-out pairs was scored: an accuracy is a multiple of 1/78 (ties: 1/156)
    assert acc and np.isclose(acc[-1] * 156, round(acc[-1] * 156))
