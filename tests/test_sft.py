"""SFT: chat loaders (errors name file:line), packed batches that keep the mask aligned and never leak
across conversations, and a learning test on a synthetic chat task that a broken mask cannot pass."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from builders import write_jsonl
from builders.reverse import SYS, make_reverse_run, sft_args
from chatfactory.config import load_config
from chatfactory.data.chat import load_conversations, parse_hh_transcript
from chatfactory.formats.jsonl import DataError
from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.store.load import load_model
from chatfactory.text.tokenizer import Tokenizer
from chatfactory.train.sft import IGNORE, PackedBatches, collate, masked_loss, pack, tokenize_conversations
from conftest import cli_cmd

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
HH = {"chosen": "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: bye\n\nAssistant: see you", "rejected": "x"}


@pytest.fixture(scope="module")
def tok():
    texts = [json.dumps(CHAT), json.dumps(ALPACA), HH["chosen"]] + [f"reverse {a} {b} {c}" for a in "abcdefgh"
                                                                    for b in "abc" for c in "xyz"]
    return Tokenizer.train(texts * 3, vocab_size=300)


def test_loaders_read_all_formats(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl.gz", [CHAT, ALPACA, HH])
    (tmp_path / "alpaca.json").write_text(json.dumps([ALPACA]))
    convs = load_conversations(f"{path},{tmp_path / 'alpaca.json'}")
    assert convs[0] == CHAT["messages"]
    assert convs[1] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                        {"role": "assistant", "content": "5"}]
    assert convs[2] == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"},
                        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]
    assert convs[3] == convs[1]
    assert parse_hh_transcript("\n\nHuman: a\n\nHuman: b\n\nAssistant: c") == [
        {"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]


@pytest.mark.parametrize("bad, match", [
    ("{not json", r"bad.jsonl:2: not valid JSON"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"bad.jsonl:2: .*unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, r"bad.jsonl:2: .*no assistant message"),
    ({"prompt": "x", "completion": "y"}, r"bad.jsonl:2: unknown chat row format"),
    ({"chosen": "Assistant: no human turn"}, r"bad.jsonl:2: not an HH transcript"),
    ({"instruction": "x", "input": 3, "output": "y"}, r"bad.jsonl:2: Alpaca fields"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [CHAT, bad])
    with pytest.raises(DataError, match=match):
        load_conversations(str(path))


def test_packed_rows_keep_mask_aligned(tok):
    convs = [CHAT["messages"], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             [{"role": "system", "content": "x"}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}]]
    xs, ys, stats = tokenize_conversations(convs, tok, seq_len=64)
    assert stats["dropped"] == stats["truncated"] == 0
    rows = pack([len(x) for x in xs], range(3), 64)
    assert sorted(i for r in rows for i in r) == [0, 1, 2] and len(rows) == 1  # all three fit one row
    b = collate(rows, xs, ys, 64, tok.pad_id)
    x, y, pos, doc = b["x"][0], b["y"][0], b["pos"][0], b["doc"][0]
    # every learned target is exactly an assistant token (or its <|end|>) of the conversation in that slot
    expect = []
    for i in rows[0]:
        ids, mask = tok.render_chat(convs[i])
        expect += [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
        assert (x[doc == rows[0].index(i)] == torch.tensor(ids[:-1])).all()
    assert y[: len(expect)].tolist() == expect and (y[len(expect):] == IGNORE).all()
    # independently of the mask code: the learned text is the assistant replies, each closed by <|end|>
    assert rows[0] == [0, 1, 2]
    assert tok.decode([t for t in y.tolist() if t != IGNORE]) == "hello<|end|>4<|end|>hello<|end|>4<|end|>"
    # positions restart at every conversation; padding is its own document
    starts = [int((doc == j).nonzero()[0]) for j in range(3)]
    assert all(pos[s] == 0 for s in starts) and (doc[len(expect):] == -1).all()


@pytest.mark.parametrize("flavour", ["gpt2", "modern"])  # gpt2's learned positions catch a position offset
def test_packing_equals_one_by_one(tok, flavour):
    """Packed rows give each conversation exactly the loss it has alone: no attention across them."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(flavour=flavour, depth=1, n_embd=64, vocab_size=tok.vocab_size, block_size=64)).eval()
    convs = [CHAT["messages"],
             [{"role": "user", "content": "reverse a b x"}, {"role": "assistant", "content": "x b a"}],
             [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]]
    xs, ys, _ = tokenize_conversations(convs, tok, seq_len=64)
    with torch.no_grad():
        packed = masked_loss(model, collate(pack([len(x) for x in xs], range(3), 64), xs, ys, 64, tok.pad_id), "sum")
        alone = sum(masked_loss(model, collate([[i]], xs, ys, 64, tok.pad_id), "sum") for i in range(3))
    assert torch.allclose(packed, alone, rtol=1e-5), (packed, alone)


def test_batches_are_stateless_and_cover_every_conversation(tok):
    xs = [torch.arange(n).numpy() for n in (5, 9, 3, 12, 7, 2, 30)]
    ys = [x.copy() for x in xs]
    a, b = PackedBatches(xs, ys, 32, 0, seed=1), PackedBatches(xs, ys, 32, 0, seed=1)
    assert all((a.micro_batch(s, 0, 1, 2)["x"] == b.micro_batch(s, 0, 1, 2)["x"]).all() for s in (3, 0, 7))
    assert sorted(i for r in a.epoch_rows(0) for i in r) == list(range(7))
    assert a.epoch_rows(0) != a.epoch_rows(1) or a.epoch_rows(1) != a.epoch_rows(2)  # reshuffled per epoch
    # DDP: two ranks' micro-batches are the single process's batch split in two
    whole = a.micro_batch(2, 0, 1, 4)["x"]
    halves = torch.cat([a.micro_batch(2, 0, 1, 2, rank=r, world=2)["x"] for r in (0, 1)])
    assert (whole == halves).all()


# ---------------------------------------------------------------- learning test (builders/reverse.py's task)
@pytest.mark.slow
def test_sft_learns_synthetic_chat_task(tmp_path):
    """Held-out exact match on "reverse: a b c" -> "c b a": ~0% before SFT, a clear majority after.
    Masking user text instead of assistant text, or dropping the <|end|> target, cannot pass."""
    run, data, tok, test_rows = make_reverse_run(tmp_path)

    def exact_match(stage):
        model, _ = load_model(run / stage)
        prompts = [tok.chat_prompt([SYS, u]) for u, _ in test_rows]
        outs = Engine(model).generate(prompts, SamplingParams(max_tokens=12, temperature=0, stop_ids=(tok.end_id,)))
        return sum(o[-1:] == [tok.end_id] and tok.decode(o[:-1]) == a
                   for o, (_, a) in zip(outs, test_rows)) / len(test_rows)

    before = exact_match("pretrain")
    from chatfactory.train.sft import run_sft

    res = run_sft(load_config(None, sft_args(data, "sft.steps=200", "sft.eval_every=0", "sft.ckpt_every=0")), run)
    after = exact_match("sft")
    print(f"exact match before {before:.0%}, after {after:.0%}, held-out assistant loss {res['val_loss']:.3f}")
    assert before <= 0.02
    assert after >= 0.6
    assert res["val_loss"] < 0.3


@pytest.mark.slow
def test_interrupted_sft_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from chatfactory.train import sft

    run, data, _, _ = make_reverse_run(tmp_path, n=300, n_test=20)
    args = sft_args(data, "sft.steps=12", "sft.ckpt_every=4", "sft.eval_every=6", "sft.batch_size=4")
    for name in ("ref", "cut"):
        shutil.copytree(run, tmp_path / name)
    ref = sft.run_sft(load_config(None, args), tmp_path / "ref")

    real = sft.PackedBatches.micro_batch

    def dies_at_step_6(self, step, *a, **k):
        if step == 6:
            raise KeyboardInterrupt  # as if killed between the checkpoint of step 4 and the next
        return real(self, step, *a, **k)

    monkeypatch.setattr(sft.PackedBatches, "micro_batch", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        sft.run_sft(load_config(None, args), tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "sft" / "config.json").read_text())["step"] == 4
    monkeypatch.setattr(sft.PackedBatches, "micro_batch", real)
    res = sft.run_sft(load_config(None, args), tmp_path / "cut")
    a, b = (load_file(tmp_path / "ref" / "sft" / "model.safetensors"),
            load_file(tmp_path / "cut" / "sft" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise, same host: a resume repeats the run's operations
    assert res["val_loss"] == ref["val_loss"]
    curve = lambda d: [json.loads(x) for x in open(d / "sft" / "metrics.jsonl")]  # noqa: E731
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tok_s", "mfu", "elapsed")} for r in rows]  # noqa: E731
    assert len(strip(curve(tmp_path / "ref"))) == 14  # 12 train rows + 2 validations (steps 6 and 12)
    assert strip(curve(tmp_path / "ref")) == strip(curve(tmp_path / "cut"))  # the whole curve, train and validation


@pytest.mark.slow
def test_sft_under_torchrun_matches_one_process(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun should be installed beside python"
    run, data, _, _ = make_reverse_run(tmp_path, n=300, n_test=20)
    for name in ("one", "two"):
        shutil.copytree(run, tmp_path / name)
    common = sft_args(data, "sft.steps=6", "sft.eval_every=3", "sft.batch_size=4", "sft.ckpt_every=0")
    one = subprocess.run(cli_cmd("sft", "--out", tmp_path / "one", *common, "sft.grad_accum=2"),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "chatfactory.cli", "sft",
                          "--out", str(tmp_path / "two"), *common], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = lambda d: [json.loads(x) for x in open(d / "sft" / "metrics.jsonl")]  # noqa: E731
    r1, r2 = rows(tmp_path / "one"), rows(tmp_path / "two")
    key = lambda rows, k: [r[k] for r in rows if k in r]  # noqa: E731
    assert len(key(r1, "loss")) == 6 and len(key(r1, "val_loss")) == 2
    assert max(abs(x - y) for x, y in zip(key(r1, "loss") + key(r1, "val_loss"),
                                          key(r2, "loss") + key(r2, "val_loss"))) < 2e-3


def test_run_sft_errors_name_what_is_wrong(tmp_path):
    from chatfactory.store.files import CheckpointError
    from chatfactory.train.sft import run_sft

    run, data, _, _ = make_reverse_run(tmp_path, n=40, n_test=5)
    with pytest.raises(CheckpointError, match=r"sft.init_from='nowhere'"):
        run_sft(load_config(None, sft_args(data, "sft.init_from=nowhere")), run)
    with pytest.raises(ValueError, match=r"sft.seq_len=128 exceeds the model's block_size=64"):
        run_sft(load_config(None, sft_args(data, "sft.seq_len=128")), run)
    bad = write_jsonl(tmp_path / "bad.jsonl", [CHAT, CHAT, {"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:3: conversation has no assistant message"):
        run_sft(load_config(None, sft_args(bad)), run)
    with pytest.raises(ValueError, match=r"unknown config key 'sft.bogus'"):
        load_config(None, ["sft.bogus=1"])
    assert not (run / "sft").exists()  # nothing was written by the failed starts


def test_sft_from_a_stage_directory_elsewhere(tmp_path):
    """init_from may be a path to any stage directory (e.g. an imported model); its tokenizer comes along."""
    from chatfactory.train.sft import run_sft

    run, data, _, _ = make_reverse_run(tmp_path, n=60, n_test=5)
    fresh = tmp_path / "fresh"
    res = run_sft(load_config(None, sft_args(data, f"sft.init_from={run / 'pretrain'}", "sft.steps=2",
                                             "sft.batch_size=2")), fresh)
    assert (fresh / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    assert json.loads((fresh / "sft" / "config.json").read_text())["finished"]
    # it trained the weights found there: each tensor moved a little from them (two steps), and its loss is still
    # about the random model's ln V (a uniform guess), not a fresh model's nor a loss of nothing
    start, tuned = load_model(run / "pretrain")[0].state_dict(), load_model(fresh / "sft")[0].state_dict()
    moved = [((tuned[k] - v).abs().max() / v.abs().max()).item() for k, v in start.items() if v.is_floating_point()]
    assert 0 < max(moved) and max(moved) < 0.2, moved
    assert abs(res["val_loss"] - math.log(start["tok_emb.weight"].shape[0])) < 0.5, res
