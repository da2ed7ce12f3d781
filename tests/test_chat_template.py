"""Chat templates from Jinja source: ids as transformers renders them, the assistant-only loss mask
placed from the rendered string, spelled special tokens kept as text, clear errors."""

import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from chatfactory.text.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TRIM = ("{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["Hello world, the quick brown fox. 12 + 30 = 42. 世界 🙂 \n\n  spaced  "] * 40


def chat_tok(template=CHATML):
    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300,
                                                     special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    chat = {"chat_template": template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "add_bos_token": False}
    return Tokenizer(t, chat), t


def hf_ids(t, template, conv, gen=False):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", chat_template=template)
    return fast.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]


CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  spaced  \n\n"},
        {"role": "assistant", "content": "\n\nHello world 🙂"}, {"role": "user", "content": "12 + 30"},
        {"role": "assistant", "content": ""}]


def test_ids_match_transformers_and_mask_covers_exactly_the_assistant_text():
    tok, t = chat_tok()
    for conv in (CONV, CONV[:4]):
        for gen in (False, True):
            assert tok.render_chat(conv, gen)[0] == hf_ids(t, CHATML, conv, gen)
    clean = CONV[:2] + [{"role": "assistant", "content": "Hello world 🙂"}] + CONV[3:]
    ids, mask = tok.render_chat(clean)
    # the masked tokens are exactly each assistant text followed by its end-of-turn token
    want = tok.encode("Hello world 🙂") + [tok.end_id] + [tok.end_id]  # the empty answer: only its end
    assert [i for i, m in zip(ids, mask) if m] == want
    assert mask[-1] == 0  # the "\n" after <|im_end|> is the template's, not the answer's
    # a token that BPE joins across the boundary ("assistant\n" + "\n\nHello": one "\n\n") is the
    # answer's first token, so it is trained: the mask covers it and everything after, nothing before
    ids, mask = tok.render_chat(CONV)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "\n\n\nHello world 🙂<|im_end|><|im_end|>"


def test_spelled_special_tokens_stay_text():
    tok, _ = chat_tok()
    ids, mask = tok.render_chat([{"role": "user", "content": "a<|im_end|>b<|im_start|>"},
                                 {"role": "assistant", "content": "<|im_end|>"}])
    assert ids.count(tok.end_id) == 2 and ids.count(tok.special["<|im_start|>"]) == 2
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "<|im_end|><|im_end|>"  # text, then the real end
    assert tok.decode(tok.encode("x <|im_end|> y")) == "x <|im_end|> y" and tok.end_id not in tok.encode("<|im_end|>")


def test_a_template_that_trims_still_places_the_mask():
    tok, t = chat_tok(TRIM)
    conv = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "  the answer  "}]
    ids, mask = tok.render_chat(conv)
    assert ids == hf_ids(t, TRIM, conv)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "the answer<|im_end|>"


def test_template_errors_are_clear():
    with pytest.raises(ValueError, match="not valid Jinja"):
        chat_tok("{% for m in messages %}")
    tok, _ = chat_tok("{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match="refused the conversation: only user turns"):
        tok.render_chat([{"role": "user", "content": "x"}])
    t = chat_tok()[1]
    with pytest.raises(ValueError, match="pad_token equals the end token"):
        Tokenizer(t, {"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                      "pad_token": "<|im_end|>"})
    with pytest.raises(ValueError, match="eos_token '<\\|eot\\|>' is not a token"):
        Tokenizer(t, {"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|eot|>",
                      "pad_token": "<|endoftext|>"})


def test_the_template_travels_with_the_tokenizer(tmp_path):
    tok, _ = chat_tok()
    tok.save(tmp_path / "tokenizer.json")
    back = Tokenizer.load(tmp_path / "tokenizer.json")
    assert back.chat_config == tok.chat_config and back.render_chat(CONV) == tok.render_chat(CONV)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.load(tmp_path / "tokenizer.json")
