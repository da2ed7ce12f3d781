"""Text sources, token shards and the stateless, DDP-aware batch loader."""
import gzip
import json
import random

import pytest
import torch

from chatfactory.config import DataConfig
from chatfactory.data.shards import PretrainBatches, build_shards, open_split
from chatfactory.data.sources import iter_texts
from chatfactory.formats.jsonl import DataError
from chatfactory.text.tokenizer import Tokenizer


def test_jsonl_gz_and_txt_sources(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "first 文"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "b.txt").write_text("plain file")
    texts = list(iter_texts(DataConfig(source=f"{tmp_path}/a.jsonl.gz,{tmp_path}/b.txt")))
    assert texts == ["first 文", "second", "plain file"]
    assert list(iter_texts(DataConfig(source=str(tmp_path)))) == texts  # a folder: its files in order


def test_bad_rows_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "cut off\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_texts(DataConfig(source=str(p))))
    p.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no string field 'text'"):
        list(iter_texts(DataConfig(source=str(p))))
    with pytest.raises(DataError, match="no such file"):
        list(iter_texts(DataConfig(source=str(tmp_path / "missing.txt"))))


def test_embedded_source_is_real_prose_and_code():
    texts = list(iter_texts(DataConfig(source="embedded", max_chars=300_000)))
    joined = "".join(texts)
    assert len(joined) == 300_000
    assert "the" in joined and ">>>" in joined  # English prose with interactive code examples


def test_parquet_source(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "t.parquet")
    assert list(iter_texts(DataConfig(source=str(tmp_path / "t.parquet")))) == ["one", "two"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    rng = random.Random(0)
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()
    texts = [f"document {i}: " + " ".join(rng.choice(words) for _ in range(20 + i % 30)) for i in range(300)]
    tok = Tokenizer.train(texts, vocab_size=300)
    cfg = DataConfig(val_fraction=0.1, shard_tokens=5000)
    meta = build_shards(texts, tok, out, cfg, progress=False)
    return out, tok, meta, texts, cfg


def test_shards_hold_every_token_with_a_validation_tail(shards):
    out, tok, meta, texts, cfg = shards
    assert len(meta["train"]) > 1  # several shard files
    n_train = sum(f["tokens"] for f in meta["train"])
    expected = sum(len(tok.encode(t)) + 1 for t in texts)
    assert n_train + meta["val"]["tokens"] == expected
    assert 0.08 < meta["val"]["tokens"] / expected < 0.12
    train = open_split(out, "train")
    assert len(train) == n_train and train.read(0, 1)[0] == tok.bos_id
    assert build_shards(texts, tok, out, cfg, progress=False) == meta  # reused, not rebuilt


def test_loader_is_a_pure_function_of_step_and_ddp_slices_it(shards):
    out = shards[0]
    a = PretrainBatches(open_split(out, "train"), 32, seed=3)
    b = PretrainBatches(open_split(out, "train"), 32, seed=3)  # a "resumed" loader
    assert torch.equal(a.micro_batch(17, 1, 2, 4)[0], b.micro_batch(17, 1, 2, 4)[0])
    x, y = a.micro_batch(5, 0, 1, 4)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # one process, batch 4 with 2 micro-batches == two ranks of batch 4 each
    single = torch.cat([a.micro_batch(5, m, 2, 4)[0] for m in range(2)])
    ranks = torch.cat([a.micro_batch(5, 0, 1, 4, rank=r, world=2)[0] for r in range(2)])
    assert torch.equal(single, ranks)
    # an epoch visits every window once
    n = (len(a.stream) - 1 - a._plan(0)[0]) // 32
    windows = {tuple(a.window(k).tolist()) for k in range(n)}
    assert len(windows) == n


def test_one_hh_parser_for_sft_and_comparisons():
    """data/chat.py's parser reads HH transcripts for SFT and for comparisons alike: consecutive turns of
    one speaker merge, so a comparison's prompt is the conversation SFT would see."""
    from chatfactory.data.chat import parse_hh_transcript, row_to_messages
    from chatfactory.data.preferences import parse_pair

    t = "\n\nHuman: hi\n\nHuman: are you there?\n\nAssistant: yes\n\nHuman: 2+2?\n\nAssistant:"
    pair = parse_pair({"chosen": t + " 4", "rejected": t + " 5\n\nAssistant: or so"}, "x.jsonl:1")
    assert pair.prompt == parse_hh_transcript(t + " 4")[:-1] == [
        {"role": "user", "content": "hi\n\nare you there?"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "2+2?"}]
    assert (pair.chosen, pair.rejected) == ("4", "5\n\nor so")  # the two last Assistant turns merge
    assert row_to_messages({"chosen": t + " 4"}, "x")[:-1] == pair.prompt
    with pytest.raises(DataError, match="x.jsonl:2: chosen: not an HH transcript"):
        parse_pair({"chosen": "no turns", "rejected": t + " 5"}, "x.jsonl:2")
