"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with the chat special tokens reserved.

Trained on the run's own text and saved as ``runs/NAME/tokenizer.json`` (plain HF format, loadable by
``tokenizers.Tokenizer.from_file`` and by ``transformers``). Byte-level means every UTF-8 string —
Chinese, emoji, code — encodes and decodes losslessly; no unknown token exists.

    tok = Tokenizer.train(texts, vocab_size=4096); tok.save("runs/x/tokenizer.json")
    ids = tok.encode("héllo 世界 🙂"); assert tok.decode(ids) == "héllo 世界 🙂"

``encode`` never produces a special token, even if the text spells one out (``"<|end|>"`` typed by a
user stays ordinary text); special ids are placed only by code, e.g. the chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]


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
