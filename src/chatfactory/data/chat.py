"""Chat data for SFT: read conversations from chat JSONL, ShareGPT, Alpaca or HH-RLHF transcripts.

Every loader yields conversations in one shape, a list of ``{"role", "content"}`` messages (see
text/tokenizer.py's ``check_messages``), so SFT never sees the file format. The format is detected per row:

  chat      ``{"messages": [{"role": "user", "content": "…"}, {"role": "assistant", …}, …]}``; a ``content``
            may be OpenAI's list of parts, ``[{"type": "text", "text": "…"}, …]`` (text parts only)
  ShareGPT  ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "…"}, …]}`` (LLaMA-Factory's and
            Axolotl's datasets; "user"/"assistant" accepted as speakers too)
  Alpaca    ``{"instruction": "…", "input": "…", "output": "…"}``  (input may be empty)
  HH        ``{"chosen": "\\n\\nHuman: …\\n\\nAssistant: …"}`` or ``{"text": transcript}``

Files are ``.jsonl`` (one object per line) or ``.json`` (one array of objects), gzip accepted; a spec
may join several with commas or name ``hf:NAME[:SUBSET]`` for a Hugging Face dataset. A bad row is a
``DataError`` naming the file and line (``path:line``; for ``.json`` arrays ``path[index]``).

A *held-out slice* (``holdout`` > 0) sets some conversations aside for good: whether one is in it is a
hash of its first user turn, so the rule needs no seed or file order, every reader agrees on it (SFT
skips the slice; pretraining's ``heldout:`` source reads only its answers, for validation), and
alternative answers to one prompt always fall on the same side.

    convs = load_conversations("../shared/data/sft/dolly/dolly_messages.jsonl.gz")
    ids, mask = tok.render_chat(convs[0])
    heldout = [c for c in convs if in_holdout(c, 0.05)]
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from ..formats.jsonl import DataError, open_text, read_jsonl
from ..text.tokenizer import check_messages

# "\n\nHuman:" / "\n\nAssistant:" open the turns of an Anthropic HH transcript
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str, where: str = "transcript") -> list[dict]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> [{"role": "user", …}, {"role": "assistant", …}].

    The one HH parser, for SFT and for comparisons (data/preferences.py) alike. Consecutive turns of
    the same speaker are merged (HH has a few); text before the first turn marker is an error, since
    it belongs to no speaker."""
    if not isinstance(text, str):
        raise DataError(f"{where}: an HH transcript must be a string, got {type(text).__name__}")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: not an HH transcript (expected it to start with '\\n\\nHuman:')")
    messages: list[dict] = []
    for speaker, body in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLE[speaker], body.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


# ShareGPT's speakers -> our roles; tool turns (function calls and their results) have no role here yet
_SHAREGPT_ROLE = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}
_TOOL_SPEAKERS = ("tool", "observation", "function_call", "function", "ipython")


def message_text(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts, whose text parts are joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise DataError(f"{where}: content must be a string or a non-empty list of parts, got "
                        f"{type(content).__name__}")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind is None:
            raise DataError(f"{where}[{i}]: a part must be {{'type': 'text', 'text': ...}}")
        if kind != "text":
            raise DataError(f"{where}[{i}]: only text parts are read, got a {kind!r} part")
        if not isinstance(part.get("text"), str):
            raise DataError(f"{where}[{i}]: a text part's 'text' must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def openai_messages(messages, where: str) -> list:
    """``messages`` with every list-of-parts content joined into its text (other shapes are left for
    ``check_messages`` to name)."""
    if not isinstance(messages, list):
        return messages
    return [{**m, "content": message_text(m["content"], f"{where}: messages[{i}].content")}
            if isinstance(m, dict) and isinstance(m.get("content"), list) else m for i, m in enumerate(messages)]


def sharegpt_messages(turns, where: str) -> list[dict]:
    """ShareGPT's ``conversations`` (``[{"from": speaker, "value": text}]``) -> messages."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    out = []
    for i, t in enumerate(turns):
        at = f"{where}: conversations[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or "value" not in t:
            raise DataError(f"{at}: a ShareGPT turn needs a string 'from' and a 'value'")
        if t["from"] in _TOOL_SPEAKERS:
            raise DataError(f"{at}: tool turns ('from': {t['from']!r}) are not read yet; chat roles only")
        if t["from"] not in _SHAREGPT_ROLE:
            raise DataError(f"{at}: unknown speaker {t['from']!r} (expected one of {', '.join(_SHAREGPT_ROLE)})")
        out.append({"role": _SHAREGPT_ROLE[t["from"]], "content": message_text(t["value"], f"{at}.value")})
    return out


def row_to_messages(row: dict, where: str) -> list[dict]:
    """One data row in any supported format -> a checked conversation. Raises DataError naming ``where``."""
    if "messages" in row:
        messages = openai_messages(row["messages"], where)
    elif "conversations" in row:
        messages = sharegpt_messages(row["conversations"], where)
    elif "instruction" in row and "output" in row:
        instr, extra, out = row["instruction"], row.get("input") or "", row["output"]
        if not all(isinstance(x, str) for x in (instr, extra, out)):
            raise DataError(f"{where}: Alpaca fields instruction/input/output must be strings")
        # the input (context) follows the instruction in the same user turn, as Alpaca's prompt did
        user = instr.strip() + ("\n\n" + extra.strip() if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": out.strip()}]
    elif "chosen" in row or "text" in row:
        messages = parse_hh_transcript(row.get("chosen", row.get("text")), where)
    else:
        raise DataError(f"{where}: unknown chat row format with keys {sorted(row)} (expected 'messages', ShareGPT "
                        f"'conversations', Alpaca 'instruction'/'input'/'output', or an HH transcript in "
                        f"'chosen'/'text')")
    try:
        check_messages(messages, "messages")
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant message, so nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _file_rows(path: Path) -> Iterator[tuple[str, dict]]:
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        for n, row in read_jsonl(path):
            yield f"{path}:{n}", row
    elif name.endswith(".json"):
        try:
            with open_text(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, EOFError, OSError) as e:
            raise DataError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json chat file must hold an array of rows (use .jsonl for one row per line)")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"{path}[{i}]: expected a JSON object, got {type(row).__name__}")
            yield f"{path}[{i}]", row
    else:
        raise DataError(f"{path}: chat data must be .jsonl or .json (optionally .gz)")


def _hf_rows(spec: str, split: str) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: Hugging Face datasets need `pip install 'chatfactory[hf]'`") from None
    name, _, subset = spec[3:].partition(":")
    for i, row in enumerate(datasets.load_dataset(name, subset or None, split=split)):
        yield f"{spec}[{i}]", dict(row)


def check_holdout(fraction: float, where: str) -> float:
    """A held-out fraction must lie in [0, 1): at 1 nothing would be left to train on."""
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise DataError(f"{where}={fraction!r}: a held-out fraction must be in [0, 1)")
    return float(fraction)


def in_holdout(conv: list[dict], fraction: float) -> bool:
    """Whether ``conv`` falls in the held-out ``fraction``: the first 8 bytes of SHA-256 of its first user
    turn, read as a number in [0, 1), are below ``fraction``."""
    if fraction <= 0:
        return False
    first = next((m["content"] for m in conv if m["role"] == "user"), "")
    digest = hashlib.sha256(("chatfactory-holdout\0" + first).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def iter_chat_rows(spec: str, split: str = "train", holdout: float = 0.0,
                   heldout: bool = False) -> Iterator[tuple[str, list[dict]]]:
    """(where, conversation) for every row of the comma-separated sources in ``spec``. With ``holdout``
    > 0 only one side of the held-out slice: the rest (``heldout=False``) or the slice itself."""
    if check_holdout(holdout, "holdout") == 0 and heldout:
        raise DataError(f"{spec}: asked for the held-out slice, but holdout=0 holds nothing out")
    for one in [s.strip() for s in spec.split(",") if s.strip()]:
        if one.startswith("hf:"):
            rows = _hf_rows(one, split)
        else:
            path = Path(one).expanduser()
            if path.is_dir():
                files = sorted(p for p in path.rglob("*")
                               if p.is_file() and p.name.removesuffix(".gz").endswith((".jsonl", ".json")))
                if not files:
                    raise DataError(f"{path}: folder holds no .jsonl/.json chat files")
                rows = (r for p in files for r in _file_rows(p))
            elif path.is_file():
                rows = _file_rows(path)
            else:
                raise DataError(f"{one}: no such chat data file or folder")
        for where, row in rows:
            conv = row_to_messages(row, where)
            if holdout <= 0 or in_holdout(conv, holdout) == heldout:
                yield where, conv


def assistant_texts(spec: str, split: str = "train", holdout: float = 0.0, heldout: bool = False) -> Iterator[str]:
    """Pretraining text from chat data: the assistant turns of each conversation of ``spec`` (one side
    of the held-out slice, as in ``iter_chat_rows``), joined by a blank line into one document."""
    for _, conv in iter_chat_rows(spec, split, holdout, heldout):
        yield "\n\n".join(m["content"] for m in conv if m["role"] == "assistant")


def load_conversations(spec: str, max_rows: int = 0, split: str = "train", holdout: float = 0.0) -> list[list[dict]]:
    """Every conversation of ``spec`` (at most ``max_rows`` if > 0), less the held-out slice if
    ``holdout`` > 0 (see ``in_holdout``)."""
    out = []
    for _, conv in iter_chat_rows(spec, split, holdout):
        out.append(conv)
        if max_rows and len(out) >= max_rows:
            break
    if not out:
        raise DataError(f"{spec}: no conversations found")
    return out
