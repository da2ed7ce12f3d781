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


BOMBS = {"a literal folded when the template compiles": "{{ 'a' * 10**10 }}",
         "loops nested past the iteration budget":
             "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
             "{% for message in messages %}{{ message['content'] }}{% endfor %}"}


def test_template_bombs_are_refused_at_load_with_a_clear_error():
    """The review's two template bombs, each loaded in a child process under a 4 GB address-space limit.
    Before: Jinja folded `'a' * 10**10` when the template compiled (`'a' * 10**9` took 19.9 s and 3.9 GB
    to load here; under the 4 GB limit the fold fails quietly and every render then fails), and the
    nested range(100000) loops loaded fine, then hung every chat request on the event loop. After: both
    are refused when the tokenizer loads, in 0.01 s, by a ValueError naming the line and the limit."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    for what, src in BOMBS.items():
        child = textwrap.dedent(f"""
            import resource, sys, time
            resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_chat_template import chat_tok
            t = time.perf_counter()
            try:
                chat_tok({src!r})
                print("loaded", round(time.perf_counter() - t, 2))
            except BaseException as e:
                print(type(e).__name__, round(time.perf_counter() - t, 2), str(e)[:300])
        """)
        p = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
        print(f"\n{what}: {p.stdout.strip() or p.stderr.strip()[-300:]}")
        kind, seconds, *message = p.stdout.split(maxsplit=2)
        assert kind == "TemplateBudgetError" and float(seconds) < 1.0, p.stdout + p.stderr[-1000:]
        assert "refused at load: line 1" in message[0] and "the limit is" in message[0]


def test_a_template_that_outgrows_its_limits_on_a_long_conversation_is_refused_in_time():
    """A template whose work grows with the conversation loads (a 4-message trial render is within limits)
    and then refuses a long conversation as a ValueError within its time limit, not a hang; so do output
    bombs built at render time."""
    import time

    from chatfactory.text.chat_template import TemplateBudgetError

    loops = ("{% for message in messages %}{% for i in range(100000) %}{% endfor %}{% endfor %}" + CHATML)
    tok, _ = chat_tok(loops)
    t = time.perf_counter()
    with pytest.raises(TemplateBudgetError, match="loop iterations"):
        tok.render_chat([{"role": "user", "content": "x"}] * 64)
    assert time.perf_counter() - t < 3
    doubling = ("{% set ns = namespace(x='ab') %}{% for m in messages %}{% for i in range(5) %}"
                "{% set ns.x = ns.x ~ ns.x %}{% endfor %}{% endfor %}" + CHATML)
    tok, _ = chat_tok(doubling)  # 4 messages: 2 MB, within the 4 MB a string may have
    with pytest.raises(TemplateBudgetError, match="would build a string"):
        tok.render_chat([{"role": "user", "content": "x"}] * 8)
    for src in ("{{ 'a'.ljust(10**9) }}", "{{ 'a' | center(10**9) }}", "{{ '%0999999999d' % 1 }}",
                "{{ ('x' * 1000000).replace('', 'yyyy') }}", "{{ 10 ** (10 ** 10) }}"):
        with pytest.raises(TemplateBudgetError):
            chat_tok(src + CHATML)
    # an ordinary template is not slowed down past use, and still matches transformers
    tok, t = chat_tok()
    assert tok.render_chat(CONV)[0] == hf_ids(t, CHATML, CONV)
