"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with the chat special tokens reserved.

Trained on the run's own text and saved as ``runs/NAME/tokenizer.json`` (plain HF format, loadable by
``tokenizers.Tokenizer.from_file`` and by ``transformers``). Byte-level means every UTF-8 string —
Chinese, emoji, code — encodes and decodes losslessly; no unknown token exists.

    tok = Tokenizer.train(texts, vocab_size=4096); tok.save("runs/x/tokenizer.json")
    ids = tok.encode("héllo 世界 🙂"); assert tok.decode(ids) == "héllo 世界 🙂"

``encode`` never produces a special token, even if the text spells one out (``"<|end|>"`` typed by a
user stays ordinary text); special ids are placed only by code, e.g. the chat template.

The chat template of runs trained here (``chat_template.OURS``; an imported chat model keeps its own,
rendered exactly as ``transformers`` renders it — see chat_template.py)::

    <|bos|> [<|system|> text <|end|>] ( <|user|> text <|end|> <|assistant|> text <|end|> )*

    ids, mask = tok.render_chat(messages)       # mask 1 on assistant text and its <|end|> only
    prompt = tok.chat_prompt(messages)           # ... <|user|> text <|end|> <|assistant|>  (generate from here)

Generation stops at ``<|end|>`` (``end_id``; ``stop_ids`` adds the other control tokens). A conversation
is a list of ``{"role": "system"|"user"|"assistant", "content": str}``; a system message may appear only
first.

A reply streamed token by token goes through ``TextStream`` (the terminal chat, the HTTP API and so the
web UI): byte-level BPE splits a Chinese character or an emoji across tokens, and a delta must never
show half of one::

    stream = TextStream(tok)
    for t in ids: print(stream.add(t), end="")   # whole characters only
    print(stream.finish())                      # == tok.decode(ids) joined with the deltas
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
CHAT_CONFIG = "tokenizer_config.json"  # an imported model's chat template, beside tokenizer.json
ROLES = ("system", "user", "assistant")


def check_messages(messages, where: str = "messages", tools: bool = False) -> None:
    """Raise ValueError naming what is wrong with a conversation (roles, types, system placement). ``tools``: the
    template renders tool calls, so ``role: tool`` and assistant messages with ``tool_calls`` (content null) pass."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    roles = ROLES + ("tool",) if tools else ROLES
    for i, m in enumerate(messages):
        calls = tools and isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
            raise ValueError(f"{where}[{i}]: a message needs a string 'role' and a string 'content'")
        if m["role"] not in roles:
            raise ValueError(f"{where}[{i}]: unknown role {m['role']!r} (expected one of {', '.join(roles)})")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"{where}[{i}]: a system message may only come first")


class Tokenizer:
    """A byte-level BPE tokenizer and the chat template its run uses.

    ``chat`` describes an imported chat model's own template, in ``tokenizer_config.json``'s keys:
    ``chat_template`` (Jinja), ``bos_token``, ``eos_token`` (the end of a turn: generation stops there),
    ``pad_token`` (never the end token) and ``add_bos_token`` (whether plain text opens with bos). None
    means ours (the module docstring)."""

    def __init__(self, hf: HFTokenizer, chat: dict | None = None):
        from .chat_template import OURS, ChatTemplate, special_pattern

        self.hf = hf
        self.chat = chat
        decoder = hf.get_added_tokens_decoder()
        added = {t.content for t in decoder.values()}
        if chat is None:
            missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
            if missing:
                raise ValueError(f"tokenizer lacks the special tokens {missing}")
            names = {"bos": "<|bos|>", "eos": "<|end|>", "pad": "<|pad|>"}
            self.add_bos, source = True, OURS
        else:
            names = {k: chat.get(f"{k}_token") for k in ("bos", "eos", "pad")}
            for k, t in names.items():
                if not isinstance(t, str) or hf.token_to_id(t) is None:
                    raise ValueError(f"chat template's {k}_token {t!r} is not a token of this tokenizer")
            if names["pad"] == names["eos"]:
                raise ValueError(f"pad_token equals the end token {names['eos']!r}: "
                                 "a model trained so never learns to stop")
            self.add_bos, source = bool(chat.get("add_bos_token", False)), chat.get("chat_template")
            if not isinstance(source, str) or not source.strip():
                raise ValueError("an imported chat model needs its chat_template (Jinja source)")
        # every added token is matched whole by the HF tokenizer: those are the ones a message may spell
        self.special = {t: hf.token_to_id(t) for t in sorted(added | set(names.values()))}
        # the control tokens: those the tokenizer marks special (a turn's markers, bos, eos) and ours. Added
        # tokens it does not mark (Qwen's <tool_call>, <think>) are words of the reply, not its end
        control = {t.content for t in decoder.values() if t.special} | set(names.values())
        self.control = {t: i for t, i in self.special.items() if t in control}
        self.special_pattern = special_pattern(self.special)
        self.bos_id, self.end_id, self.pad_id = (hf.token_to_id(names[k]) for k in ("bos", "eos", "pad"))
        self.template = ChatTemplate(source, bos_token=names["bos"], eos_token=names["eos"], pad_token=names["pad"])
        self.chat_config = {"chat_template": source, "bos_token": names["bos"], "eos_token": names["eos"],
                            "pad_token": names["pad"], "add_bos_token": self.add_bos}  # what an export writes
        self._token_bytes = None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a reply in chat and serving: the end of turn and every other control token
        (a model that opens a new turn, or a new document, has finished its answer)."""
        return tuple(sorted(i for i in self.control.values() if i != self.pad_id))

    def document(self, text: str) -> list[int]:
        """Plain text as a document the model reads: opened with bos when the model's tokenizer does that."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text)

    # ---- building ----
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path) -> Tokenizer:
        """``tokenizer.json``, with the chat template of ``tokenizer_config.json`` beside it if there is one."""
        import json

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        chat, cpath = None, path.with_name(CHAT_CONFIG)
        if cpath.exists():
            try:
                chat = json.loads(cpath.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{cpath}: not valid JSON ({e})") from None
            if not isinstance(chat, dict):
                raise ValueError(f"{cpath}: expected a JSON object, found a {type(chat).__name__}")
            from .chat_template import OURS

            keys = ("chat_template", "bos_token", "eos_token", "pad_token", "add_bos_token")
            chat = None if chat.get("chat_template") == OURS else {k: chat.get(k) for k in keys}  # ours, exported
        try:
            return cls(hf, chat)
        except ValueError as e:
            raise ValueError(f"{cpath if chat else path}: {e}") from None

    def save(self, path) -> None:
        """``tokenizer.json`` (plus ``tokenizer_config.json`` for an imported chat template)."""
        import json

        from ..store.files import atomic_write_text

        atomic_write_text(path, self.hf.to_str(pretty=True))
        if self.chat is not None:
            atomic_write_text(Path(path).with_name(CHAT_CONFIG), json.dumps(self.chat, indent=2, ensure_ascii=False))

    # ---- using ----
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Ordinary text -> ids. Spelled-out special tokens are split so they stay ordinary text."""
        if not self.special_pattern.search(text):
            return self.hf.encode(text, add_special_tokens=False).ids
        return [i for piece in self._split_specials(text) for i in self.hf.encode(piece, add_special_tokens=False).ids]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not any(self.special_pattern.search(t) for t in texts):  # the fast, multi-threaded path
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def _split_specials(self, text: str) -> list[str]:
        # encode "<|end|>" as "<" + "|end|>": the added-token matcher never sees the whole string
        cuts = [m.start() + 1 for m in self.special_pattern.finditer(text)]
        return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]

    # ---- chat template ----
    def render_chat(self, messages, add_generation_prompt: bool = False,
                    options: dict | None = None) -> tuple[list[int], list[int]]:
        """A conversation -> (ids, loss mask), rendered by the run's chat template. The mask is 1 on
        every assistant message's text and its end-of-turn token and 0 elsewhere (role markers, system
        and user text). With ``add_generation_prompt`` the opening of an assistant turn is appended;
        ``options``: more variables the template reads (``{"enable_thinking": False}`` for Qwen3's)."""
        check_messages(messages, tools=self.template.supports_tools)
        return self.template.render(self, messages, add_generation_prompt, options)

    def chat_prompt(self, messages, options: dict | None = None) -> list[int]:
        """Ids of a conversation followed by an open assistant turn: what generation continues."""
        return self.render_chat(messages, add_generation_prompt=True, options=options)[0]

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_text(self, i: int) -> str:
        """One token as log-prob listings name it: its text, or ``bytes:\\xe4\\xbd`` when its bytes are not
        whole characters (half a Chinese character would read as U+FFFD, and two different halves would
        share that name; the escaped form keeps them apart and can be turned back into the bytes)."""
        b = self.token_bytes[i]
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b)

    def decode_bytes(self, ids) -> bytes:
        """Exact bytes of the ids (specials as their text), for streaming and bits-per-byte."""
        tb = self.token_bytes
        return b"".join(tb[i] for i in ids)

    @property
    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for (index = id)."""
        if self._token_bytes is None:
            inverse = {c: b for b, c in _bytes_to_unicode().items()}
            special = set(SPECIAL_TOKENS) | {t.content for t in self.hf.get_added_tokens_decoder().values()}
            out = [b""] * self.vocab_size
            for tok, i in self.hf.get_vocab(with_added_tokens=True).items():
                out[i] = tok.encode("utf-8") if tok in special else bytes(inverse[c] for c in tok)
            self._token_bytes = out
        return self._token_bytes


class TextStream:
    """Token ids (or raw bytes) in, text deltas out, holding back the bytes of a character that the next
    token may still complete, so that no delta shows a replacement character (U+FFFD) for half of one.

    ``finish()`` flushes what is held: bytes that never became a character (a reply cut short by its
    token limit, or a model that emitted invalid UTF-8) come out there as U+FFFD, one per maximal
    invalid sequence. Bytes that can never start or continue a character are shown as U+FFFD at once
    (no later token can repair them). Either way the joined deltas equal ``Tokenizer.decode`` of the
    same ids (and what a browser's ``TextDecoder`` shows for the same bytes)."""

    def __init__(self, tok: Tokenizer | None = None):
        self.tok = tok  # needed by add(), not by add_bytes()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, ids) -> str:
        """One id or a list of ids -> the characters they complete ('' while one is still open)."""
        if self.tok is None:
            raise TypeError("TextStream.add needs the tokenizer that made the ids: TextStream(tok) "
                            "(add_bytes takes raw bytes)")
        return self.add_bytes(self.tok.decode_bytes([ids] if isinstance(ids, int) else ids))

    def add_bytes(self, data: bytes) -> str:
        return self._utf8.decode(data)

    def finish(self) -> str:
        """The end of the reply: what is still held, as U+FFFD (usually '')."""
        return self._utf8.decode(b"", final=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level BPE tokens are spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
