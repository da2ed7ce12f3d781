"""Streaming Chinese and emoji (issue 17, item 3): byte-level BPE splits a character across tokens, and no
streamed delta may show a replacement character (U+FFFD) for one that the next token completes; the
joined deltas equal the final text, and the final text equals the non-streamed answer.

  * unit: ``tokenizer.TextStream`` and the server's ``Detokenizer`` (stop strings) fed Chinese text and
    emoji (skin tones, ZWJ sequences, flags) cut at every byte split point, and a real tokenizer's splits;
    bytes that never form a character come out as U+FFFD in the final flush only;
  * end to end: a run whose model greedily emits a fixed reply, token by token, with tokens cut through
    the middle of characters (weights set by hand, see ``make_echo_run``), served by a real
    ``chatfactory serve`` subprocess (SSE: chat and completions, n=2, logprobs, a stop string whose last
    character is split, a token limit that cuts a character) and through the terminal chat;
  * the web UI in Chromium: a MutationObserver records every text the reply shows while it streams, from
    the real server, and from a bare stand-in that writes the SSE bytes a few at a time, so characters
    are split between the browser's network reads too.
"""
import json
import random
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.serve.detokenize import Detokenizer
from chatfactory.store.checkpoint import save_checkpoint, unique_state_dict
from chatfactory.text.tokenizer import SPECIAL_TOKENS, TextStream, Tokenizer, _bytes_to_unicode
from conftest import cli_cmd, serve_subprocess

FFFD = "\ufffd"
TEXTS = ["「你好，世界！」", "👋🏽 hi 👩‍💻 and 🇨🇳", "é中😀a", "你好，世界！👋🏽 我是👩‍💻。"]
# the reply the hand-set model gives: Chinese, emoji with a skin tone, a ZWJ sequence, a flag, Latin;
# no Markdown marks, so the web UI shows it as it is
REPLY = "「你好，世界！」👋🏽 我是👩‍💻，很高兴见到你。🇨🇳 Olá!"


def deltas_of(pieces: list[bytes]) -> tuple[list[str], str]:
    s = TextStream()
    out = [s.add_bytes(p) for p in pieces]
    return out, s.finish()


# ---------------------------------------------------------------- unit: every split point

@pytest.mark.parametrize("text", TEXTS)
def test_every_byte_split_point_gives_whole_characters(text):
    b = text.encode()
    splits = [[b[:i], b[i:j], b[j:]] for i in range(len(b) + 1) for j in range(i, len(b) + 1)]  # all pairs of cuts
    splits.append([b[i:i + 1] for i in range(len(b))])  # one byte per token
    for pieces in splits:
        out, tail = deltas_of(pieces)
        assert not any(FFFD in d for d in out) and tail == "", pieces
        assert "".join(out) == text
    # a delta appears exactly when a character is complete: after byte k, the characters whose last byte is k
    out, _ = deltas_of([b[i:i + 1] for i in range(len(b))])
    ends = {len(text[:k + 1].encode()) - 1: text[k] for k in range(len(text))}
    assert out == [ends.get(i, "") for i in range(len(b))]


def test_bytes_that_never_form_a_character_show_once_in_the_flush():
    # cut short mid-character (a token limit): nothing while it could still complete, U+FFFD at the end
    b = "好😀".encode()
    for cut in range(4, len(b)):  # inside the emoji
        out, tail = deltas_of([b[i:i + 1] for i in range(cut)])
        assert "".join(out) == "好" and tail == FFFD
    # invalid bytes anywhere (a model may emit any byte sequence): at every split the same text as a
    # one-shot decode (and as a browser's TextDecoder, which follows the same rule)
    rng = random.Random(0)
    alphabet = [b"\xe4", b"\xbd", b"\xa0", b"\xf0", b"\x9f", b"\xff", b"a", "好".encode(), b"\xc3"]
    for _ in range(200):
        b = b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        for i in range(len(b) + 1):
            out, tail = deltas_of([b[:i], b[i:]])
            assert "".join(out) + tail == b.decode("utf-8", "replace"), b


def real_tokenizers():
    """One trained on English only (Chinese and emoji fall apart into single bytes) and one trained on
    a little Chinese, whose merges join bytes across character boundaries."""
    en = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=300)
    zh = Tokenizer.train(["你好世界，我是一个助手。很高兴见到你！" * 30, "👋🏽👩‍💻🇨🇳 " * 30], vocab_size=320,
                         min_frequency=2)
    return {"en": en, "zh": zh}


def splits_characters(tok, ids) -> bool:
    return any(not _whole(tok.token_bytes[i]) for i in ids)


def _whole(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("which", ["en", "zh"])
def test_real_tokenizer_splits(which):
    tok = real_tokenizers()[which]
    for text in TEXTS:
        ids = tok.encode(text)
        assert splits_characters(tok, ids), f"{which}: {text!r} is not split inside a character"
        s = TextStream(tok)
        out = [s.add(t) for t in ids]
        assert not any(FFFD in d for d in out) and s.finish() == "" and "".join(out) == text
        d = Detokenizer(tok, [])  # the server's, with its stop-string hold-back
        out = [d.add(t) for t in ids] + [d.add(None, final=True)]
        assert not any(FFFD in x for x in out) and "".join(out) == text


def test_stop_string_whose_last_character_is_split():
    """Cut every stop of TEXTS[3] ("世", "界！", "👩‍💻"...) at every split point: the text up to it, no U+FFFD."""
    tok = real_tokenizers()["en"]  # one token per byte: every character is split
    text = TEXTS[3]
    for stop in ("世", "界！", "👋🏽", "👩‍💻", "。"):
        d = Detokenizer(tok, [stop, "never"])
        out = [d.add(t) for t in tok.encode(text)] + [d.add(None, final=True)]
        assert d.stopped and "".join(out) == text[: text.index(stop)] and not any(FFFD in x for x in out), stop


# ---------------------------------------------------------------- a model that says REPLY

def reply_pieces(text: str) -> list[bytes]:
    """REPLY's bytes cut into distinct pieces whose ends mostly fall inside characters (lengths 2, 3, 1,
    4, 5, ...; a piece seen before grows by a byte), so each piece can be one token of a chain."""
    b, pieces, i, k = text.encode(), [], 0, 0
    while i < len(b):
        n = [2, 3, 1, 4, 5][k % 5]
        k += 1
        while b[i:i + n] in pieces and i + n < len(b):
            n += 1
        pieces.append(b[i:i + n])
        i += n
    assert len(set(pieces)) == len(pieces) and b"".join(pieces) == b
    return pieces


def make_echo_run(root: Path, prompt_token: str = "Q") -> tuple[Path, list[int]]:
    """A run whose 'sft' model greedily answers REPLY to any chat (and continues the text ``Q`` with it).

    The tokenizer is byte-level BPE with the 256 bytes, the chat tokens, and REPLY's pieces as extra
    tokens (no merges: ``encode`` never makes them, only the model does). The model is a 1-layer GPT
    whose blocks add nothing (their output projections are zero), so the logits depend on the last token
    alone: the embedding gives each token of the chain its own orthonormal direction and the LM head
    maps it to the next one (``<|assistant|>`` -> piece 1 -> ... -> the last piece -> ``<|end|>``), a
    margin of 16 logits over every other id. Returns the run and REPLY's ids."""
    b2u = _bytes_to_unicode()
    spell = lambda b: "".join(b2u[x] for x in b)  # noqa: E731  (bytes as byte-level BPE spells them)
    vocab = {spell(bytes([i])): i for i in range(256)}
    pieces = reply_pieces(REPLY)
    for p in pieces:
        vocab.setdefault(spell(p), len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(SPECIAL_TOKENS)
    tok = Tokenizer(hf)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(root / "tokenizer.json")
    ids = [vocab[spell(p)] for p in pieces]
    chain = [tok.special["<|assistant|>"]] + ids + [tok.end_id]
    cfg = GPTConfig(flavour="modern", depth=1, n_embd=128, head_dim=32, vocab_size=tok.vocab_size, block_size=256)
    model = GPT(cfg)
    q = torch.linalg.qr(torch.randn(cfg.n_embd, cfg.n_embd, generator=torch.Generator().manual_seed(0)))[0]
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.proj.weight.zero_()
            blk.mlp.proj.weight.zero_()
        model.tok_emb.weight.zero_()
        model.lm_head.weight.zero_()
        links = list(zip(chain, chain[1:])) + [(tok.encode(prompt_token)[-1], ids[0])]
        for k, (a, nxt) in enumerate(links):
            model.tok_emb.weight[a] = q[k]
            model.lm_head.weight[nxt] += 2 * q[k]  # RMSNorm scales q[k] to norm sqrt(128): logit 2 * 11.3
    save_checkpoint(root / "sft", unique_state_dict(model), {"stage": "sft", "model": cfg.to_dict(), "finished": True})
    return root, ids


@pytest.fixture(scope="module")
def echo_run(tmp_path_factory):
    root, ids = make_echo_run(tmp_path_factory.mktemp("utf8") / "echo")
    tok = Tokenizer.load(root / "tokenizer.json")
    assert tok.decode(ids) == REPLY and splits_characters(tok, ids)
    # most token ends fall inside a character
    ends = [len(tok.decode_bytes(ids[: k + 1])) for k in range(len(ids))]
    inside = sum(not _whole(REPLY.encode()[:e]) for e in ends)
    assert inside >= len(ids) // 2, (inside, len(ids))
    return root, tok, ids


def test_the_hand_set_model_says_the_reply(echo_run):
    from chatfactory.inference.engine import Engine
    from chatfactory.inference.sampling import SamplingParams
    from chatfactory.store.load import load_model

    root, tok, ids = echo_run
    model, _ = load_model(root / "sft")
    p = SamplingParams(max_tokens=len(ids) + 5, temperature=0, stop_ids=tok.stop_ids)
    for user in ("你好", "hi"):
        assert Engine(model).generate([tok.chat_prompt([{"role": "user", "content": user}])], p)[0] == \
            ids + [tok.end_id]


# ---------------------------------------------------------------- end to end: the terminal chat

def test_terminal_chat_streams_whole_characters(echo_run):
    from chatfactory.inference.chat import ChatSession
    from chatfactory.inference.sampling import SamplingParams
    from chatfactory.store.load import load_model

    root, tok, ids = echo_run
    model, _ = load_model(root / "sft")
    session = ChatSession(model, tok, SamplingParams(max_tokens=100, temperature=0))
    pieces = []
    with torch.no_grad():
        answer = session.reply("你好", write=pieces.append)
    assert answer == REPLY and "".join(pieces) == REPLY and not any(FFFD in p for p in pieces)
    assert len(pieces) >= 15  # streamed piece by piece, not at the end
    # a token limit that cuts a character: the flush shows one U+FFFD, last
    k = next(k for k in range(5, len(ids)) if not _whole(tok.decode_bytes(ids[:k])))
    session = ChatSession(model, tok, SamplingParams(max_tokens=k, temperature=0))
    pieces = []
    with torch.no_grad():
        answer = session.reply("你好", write=pieces.append)
    assert answer == tok.decode(ids[:k]) and answer.endswith(FFFD) and answer.count(FFFD) == 1
    assert pieces[-1] == FFFD and "".join(pieces) == answer


@pytest.mark.slow
def test_terminal_chat_subprocess_prints_the_reply(echo_run):
    """`chatfactory chat` as a user runs it: its stdout is UTF-8 and holds the whole reply."""
    root, tok, ids = echo_run
    out = subprocess.run(cli_cmd("chat", "--run", root, "--temperature", "0"), input="你好\n/quit\n".encode(),
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    text = out.stdout.decode("utf-8")  # strict: any broken byte sequence fails here
    assert "assistant> " + REPLY + "\n" in text and FFFD not in text


# ---------------------------------------------------------------- end to end: `chatfactory serve` over SSE

@pytest.fixture(scope="module")
def served(echo_run):
    root, tok, ids = echo_run
    with serve_subprocess(root, "--slots", 4) as url:
        yield url, tok, ids


def call(url, path, body) -> list[dict] | dict:
    """POST ``body``; a stream -> its events (JSON objects, [DONE] checked and dropped), else the JSON answer.
    The raw bytes are decoded strictly: a broken UTF-8 sequence on the wire fails the test."""
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    raw = urllib.request.urlopen(req, timeout=60).read().decode("utf-8")
    if not body.get("stream"):
        return json.loads(raw)
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def joined(events, field="content") -> dict[int, list[str]]:
    """The text deltas of each answer, in order."""
    out: dict[int, list[str]] = {}
    for e in events:
        assert "error" not in e, e
        for c in e["choices"]:
            d = c["delta"].get("content") if "delta" in c else c["text"]
            if d:
                out.setdefault(c["index"], []).append(d)
    return out


CHAT = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"n": 2}, {"logprobs": True, "top_logprobs": 2}],
                         ids=["plain", "n=2", "logprobs"])
def test_sse_chat_deltas_are_whole_characters(served, extra):
    url, tok, ids = served
    whole = call(url, "/v1/chat/completions", {**CHAT, **extra})
    events = call(url, "/v1/chat/completions", {**CHAT, **extra, "stream": True})
    streamed = joined(events)
    assert len(streamed) == len(whole["choices"]) == extra.get("n", 1)
    for c in whole["choices"]:
        assert c["message"]["content"] == REPLY and "".join(streamed[c["index"]]) == REPLY
        assert not any(FFFD in d for d in streamed[c["index"]])
    if "logprobs" in extra:
        # one chunk per token that shows text: as many as the characters completed one token at a time
        assert len(streamed[0]) == sum(bool(d) for d in _token_deltas(tok, ids)) < len(ids)
        # every token's entry arrives once, in order, equal to the non-streamed listing (none shows U+FFFD)
        got = [x for e in events for c in e["choices"] for x in ((c.get("logprobs") or {}).get("content") or [])]
        want = whole["choices"][0]["logprobs"]["content"]
        assert got == want and [x["token"] for x in got] == [tok.token_text(t) for t in ids]
        assert b"".join(bytes(x["bytes"]) for x in got).decode() == REPLY
        assert not any(FFFD in x["token"] for x in got) and any(x["token"].startswith("bytes:") for x in got)


def _token_deltas(tok, ids) -> list[str]:
    s = TextStream(tok)
    return [s.add(t) for t in ids]


@pytest.mark.slow
def test_sse_completions_n2_and_stop_and_length_cuts(served):
    url, tok, ids = served
    body = {"prompt": "Q", "max_tokens": 100, "temperature": 0, "n": 2}
    whole = call(url, "/v1/completions", body)
    streamed = joined(call(url, "/v1/completions", {**body, "stream": True}))
    assert [c["text"] for c in whole["choices"]] == [REPLY, REPLY]
    assert (["".join(streamed[i]) for i in (0, 1)] == [REPLY, REPLY]
            and not any(FFFD in d for d in streamed[0] + streamed[1]))

    # stop strings whose last character is split across tokens, where the token that completes it also
    # carries bytes of the next character: the answer ends just before, streamed or not
    ends = {len(tok.decode_bytes(ids[: k + 1])) for k in range(len(ids))}
    split = [ch for i, ch in enumerate(REPLY) if len(REPLY[: i + 1].encode()) not in ends and REPLY.index(ch) == i
             and len(ch.encode()) > 1 and i > 2]
    assert len(split) >= 3
    for stop in (split[0], REPLY[REPLY.index(split[1]) - 1: REPLY.index(split[1]) + 1], split[-1]):
        want = REPLY[: REPLY.index(stop)]
        for path, req in (("/v1/chat/completions", {**CHAT, "stop": stop}),
                          ("/v1/completions", {**body, "n": 1, "stop": [stop]})):
            got = call(url, path, req)["choices"][0]
            assert got.get("text", (got.get("message") or {}).get("content")) == want and \
                got["finish_reason"] == "stop", stop
            deltas = joined(call(url, path, {**req, "stream": True}))[0]
            assert "".join(deltas) == want and not any(FFFD in d for d in deltas), (stop, deltas)

    # a token limit that ends inside a character: U+FFFD once, in the last delta (the flush), as without streaming
    k = next(k for k in range(8, len(ids)) if not _whole(tok.decode_bytes(ids[:k])))
    want = tok.decode(ids[:k])
    for path, req in (("/v1/chat/completions", {**CHAT, "max_tokens": k}),
                      ("/v1/completions", {**body, "n": 1, "max_tokens": k})):
        got = call(url, path, req)["choices"][0]
        assert got.get("text", (got.get("message") or {}).get("content")) == want and got["finish_reason"] == "length"
        deltas = joined(call(url, path, {**req, "stream": True}))[0]
        assert "".join(deltas) == want and want.count(FFFD) == 1 and deltas[-1].endswith(FFFD)
        assert not any(FFFD in d for d in deltas[:-1])


# ---------------------------------------------------------------- the web UI in Chromium

RECORD = """() => {
    window.__seen = [];
    new MutationObserver(() => {
      for (const el of document.querySelectorAll('.msg.assistant .content')) window.__seen.push(el.textContent);
    }).observe(document.getElementById('chat'), {subtree: true, childList: true, characterData: true});
}"""


def chat_in_browser(browser, url: str, model: str) -> tuple[str, list[str]]:
    """Send 你好 in the web UI at ``url`` -> (the reply shown at the end, every distinct text it showed)."""
    page = browser.new_page(bypass_csp=True)  # Playwright's waits evaluate strings
    page.goto(url + "/")
    page.wait_for_function(f"document.getElementById('model').textContent === '{model}'")
    page.evaluate(RECORD)
    page.fill("#input", "你好")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .thumb-up", timeout=30_000)
    seen = page.evaluate("window.__seen")
    shown = page.locator(".msg.assistant .content").text_content()
    page.close()
    return shown, [s for s in dict.fromkeys(seen) if s]


@pytest.mark.browser
def test_web_ui_never_shows_a_broken_character(browser, echo_run, serve_run):
    root, tok, ids = echo_run
    url, svc, _ = serve_run(root, slots=2)
    real_step = svc.scheduler.step

    def paced_step():  # 15 ms a token, so the page sees the reply grow token by token
        time.sleep(0.015)
        real_step()
    svc.scheduler.step = paced_step
    shown, states = chat_in_browser(browser, url, "echo/sft")
    assert shown == REPLY
    assert len(states) >= 8, states  # it streamed
    assert all(FFFD not in s and REPLY.startswith(s) for s in states), [s for s in states if not REPLY.startswith(s)]


class Trickle(BaseHTTPRequestHandler):
    """Test-only stand-in for the server: the page's files, a model card, and a chat stream whose SSE
    bytes (one event per character of REPLY) leave ``step`` bytes at a time, so most network reads end
    inside a character."""
    step, protocol_version = 5, "HTTP/1.0"

    def do_GET(self):
        from chatfactory.serve.openapi import STATIC

        if self.path == "/v1/models":
            return self.send(json.dumps({"data": [{"id": "trickle", "precision": "float32",
                                                   "memory": "resident"}]}).encode(), "application/json")
        name = "index.html" if self.path == "/" else self.path.removeprefix("/static/")
        kind = {"html": "text/html", "js": "text/javascript", "css": "text/css"}[name.rsplit(".", 1)[-1]]
        self.send((STATIC / name).read_bytes(), kind + "; charset=utf-8")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        events = [{"choices": [{"index": 0, "delta": {"content": ch}, "finish_reason": None}]} for ch in REPLY]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        body = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write its own packet
        for i in range(0, len(body), self.step):
            self.wfile.write(body[i:i + self.step])
            time.sleep(0.002)

    def send(self, data: bytes, kind: str):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.browser
def test_web_ui_decodes_characters_split_between_network_reads(browser):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        shown, states = chat_in_browser(browser, f"http://127.0.0.1:{server.server_address[1]}", "trickle")
    finally:
        server.shutdown()
        server.server_close()
    assert shown == REPLY and len(states) >= 8, states
    assert all(FFFD not in s and REPLY.startswith(s) for s in states), [s for s in states if not REPLY.startswith(s)]
