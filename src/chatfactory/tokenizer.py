"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with the chat special tokens reserved.

Trained on the run's own text and saved as ``runs/NAME/tokenizer.json`` (plain HF format, loadable by
``tokenizers.Tokenizer.from_file`` and by ``transformers``). Byte-level means every UTF-8 string —
Chinese, emoji, code — encodes and decodes losslessly; no unknown token exists.

    tok = Tokenizer.train(texts, vocab_size=4096); tok.save("runs/x/tokenizer.json")
    ids = tok.encode("héllo 世界 🙂"); assert tok.decode(ids) == "héllo 世界 🙂"

``encode`` never produces a special token, even if the text spells one out (``"<|end|>"`` typed by a
user stays ordinary text); special ids are placed only by code, e.g. the chat template.

The chat template (one place; the export's Jinja template renders the same ids)::

    <|bos|> [<|system|> text <|end|>] ( <|user|> text <|end|> <|assistant|> text <|end|> )*

    ids, mask = tok.render_chat(messages)       # mask 1 on assistant text and its <|end|> only
    prompt = tok.chat_prompt(messages)           # ... <|user|> text <|end|> <|assistant|>  (generate from here)

Generation stops at ``<|end|>``. A conversation is a list of ``{"role": "system"|"user"|"assistant",
"content": str}``; a system message may appear only first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
ROLES = ("system", "user", "assistant")


def check_messages(messages, where: str = "messages") -> None:
    """Raise ValueError naming what is wrong with a conversation (roles, types, system placement)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}]: a message needs a string 'role' and a string 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}[{i}]: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"{where}[{i}]: a system message may only come first")


class Tokenizer:
    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.special = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        self.bos_id, self.end_id, self.pad_id = self.special["<|bos|>"], self.special["<|end|>"], self.special["<|pad|>"]
        self._token_bytes = None

    # ---- building ----
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> "Tokenizer":
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None

    def save(self, path) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(path, self.hf.to_str(pretty=True))

    # ---- using ----
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Ordinary text -> ids. Spelled-out special tokens are split so they stay ordinary text."""
        if "<|" not in text:
            return self.hf.encode(text, add_special_tokens=False).ids
        return [i for piece in self._split_specials(text) for i in self.hf.encode(piece, add_special_tokens=False).ids]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not any("<|" in t for t in texts):  # the fast, multi-threaded path
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def _split_specials(self, text: str) -> list[str]:
        # encode "<|end|>" as "<|" + "end|>": the added-token matcher never sees the whole string
        pieces = [text]
        for tok in SPECIAL_TOKENS:
            pieces = [p for chunk in pieces for p in _split_keep(chunk, tok)]
        return pieces

    # ---- chat template ----
    def render_chat(self, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """A conversation -> (ids, loss mask). The mask is 1 on every assistant message's text and its
        closing ``<|end|>`` and 0 elsewhere (role tokens, system and user text). With
        ``add_generation_prompt`` an open ``<|assistant|>`` is appended (mask 0)."""
        check_messages(messages)
        sp = self.special
        ids, mask = [self.bos_id], [0]
        for m in messages:
            body = self.encode(m["content"]) + [self.end_id]
            ids.append(sp[f"<|{m['role']}|>"])
            mask.append(0)
            ids += body
            mask += [1 if m["role"] == "assistant" else 0] * len(body)
        if add_generation_prompt:
            ids.append(sp["<|assistant|>"])
            mask.append(0)
        return ids, mask

    def chat_prompt(self, messages) -> list[int]:
        """Ids of a conversation followed by an open assistant turn: what generation continues."""
        return self.render_chat(messages, add_generation_prompt=True)[0]

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

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


def _split_keep(text: str, token: str) -> list[str]:
    if token not in text:
        return [text]
    parts = text.split(token)
    out = [parts[0]]
    for p in parts[1:]:
        out += [token[:2], token[2:], p]
    return [p for p in out if p]


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
