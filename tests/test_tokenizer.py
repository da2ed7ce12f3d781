"""Byte-level BPE: lossless on any UTF-8, special tokens reserved and never produced from text."""
import pytest

from chatfactory.text.tokenizer import SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b  # sum\n" * 20,
    "机器学习是人工智能的一个分支。我们今天去公园散步吧！" * 20,
    "emoji 🙂🚀🔥 and accents: café, naïve, Zürich " * 20,
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=400)


MIXED = [
    "Hello, world!",
    "混合 English 与中文, plus emoji 👩‍💻🎉 and code: `for i in range(10): print(i**2)`",
    "\t\n  leading/trailing whitespace  \n\n",
    "繁體字與簡體字、日本語のテキスト、한국어 텍스트",
    "rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ E⋅da = Q, ﷽, \u0000 nul and \u200b zero-width",
    "",
]


@pytest.mark.parametrize("text", MIXED)
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_special_tokens_are_reserved_first(tok):
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.pad_id != tok.end_id


def test_spelled_out_special_tokens_stay_ordinary_text(tok):
    text = "a user typed <|end|> and <|assistant|> here"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special.values())
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"])[0] == ids


def test_merges_learned_from_corpus(tok):
    # merges learned from the corpus compress it well below one token per byte
    text = CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode()) / 2.5


def test_save_and_load(tmp_path, tok):
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(MIXED[1]) == tok.encode(MIXED[1])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")


def test_chat_template_masks_assistant_text_and_end_only(tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    ids, mask = tok.render_chat(conv)
    sp, enc = tok.special, tok.encode
    expect = ([sp["<|bos|>"], sp["<|system|>"]] + enc("Be brief.") + [sp["<|end|>"], sp["<|user|>"]] + enc("hi")
              + [sp["<|end|>"], sp["<|assistant|>"]] + enc("hello") + [sp["<|end|>"], sp["<|user|>"]] + enc("2+2?")
              + [sp["<|end|>"], sp["<|assistant|>"]] + enc("4") + [sp["<|end|>"]])
    assert ids == expect and len(mask) == len(ids)
    # exactly the assistant texts and their closing <|end|> are trained on
    assert [i for i, m in zip(ids, mask) if m] == enc("hello") + [sp["<|end|>"]] + enc("4") + [sp["<|end|>"]]
    prompt = tok.chat_prompt(conv[:4])
    assert prompt == expect[: len(prompt) - 1] + [sp["<|assistant|>"]]


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty"), ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": 3}], "string 'content'"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "only come first"),
])
def test_chat_template_rejects_bad_conversations(tok, bad, match):
    with pytest.raises(ValueError, match=match):
        tok.render_chat(bad)
