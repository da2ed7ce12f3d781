"""Chat templates: a conversation -> token ids plus the assistant-only loss mask, from Jinja source.

Every run carries one template. Runs trained here use ours (``OURS`` below); an imported chat model
keeps its own (SmolLM2's ChatML ``<|im_start|>role\\n…<|im_end|>``, Qwen2's, …), read from its GGUF
metadata or ``tokenizer_config.json`` and rendered with Jinja in the same sandbox and with the same
options, filters and globals as ``transformers``' ``apply_chat_template``, so the ids are the same.

How the ids and the mask come out of a rendered string (``render``):

1. The template is rendered twice: once with the real messages, once with each content replaced by a
   marker. Where the markers render back to the real string, they say exactly where each message's
   text lies; a template that changes the text it shows (a ``| trim``) falls back to finding each
   content in order.
2. The string is cut at every special token the *template* wrote — the cuts ``transformers``' added-
   token matcher makes — and each piece between two cuts is encoded whole, as there. A special token
   spelled inside a message stays text: it is broken after its first character, so it can never
   become the control token (the one place where our ids differ from ``transformers``, on purpose).
3. Byte-level BPE is lossless, so adding up each token's bytes gives its place in the string: the mask
   is 1 on tokens that overlap an assistant message's text, and on the first special token after it
   (its end-of-turn token), and 0 elsewhere.

    tpl = ChatTemplate(OURS)  # or ChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>")
    ids, mask = tpl.render(tok, messages, add_generation_prompt=False)
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

# Our template (runs trained from scratch). The export writes it into tokenizer_config.json, so
# transformers' apply_chat_template renders the same ids.
OURS = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ' (expected system, user or assistant)') }}"
    "{% endif %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('a system message may only come first') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_MARK = "\ue000{}\ue001"  # private-use characters: no real message holds them


@lru_cache(maxsize=16)
def _compile(source: str):
    """Jinja as transformers sets it up: sandboxed, trim_blocks + lstrip_blocks, loop controls, a
    tojson that does not escape HTML, raise_exception and strftime_now."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


class ChatTemplate:
    """A Jinja chat template and the token strings it is rendered with."""

    def __init__(self, source: str, **tokens: str | None):
        self.source = source
        self.tokens = {k: v for k, v in tokens.items() if v is not None}  # bos_token, eos_token, …
        _compile(source)  # a broken template fails here, when the run is opened, not mid-training

    def render_text(self, messages, add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **self.tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template refused the conversation: {e}") from None

    def spans(self, messages, text: str, add_generation_prompt: bool) -> list[tuple[int, int]]:
        """Where each message's content lies in ``text`` (character offsets)."""
        marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
        mtext = self.render_text(marked, add_generation_prompt)
        out, pieces, pos, shift = [], [], 0, 0
        for i, m in enumerate(messages):
            at = mtext.find(_MARK.format(i), pos)
            if at < 0:
                break
            pieces.append(mtext[pos:at])
            start = at + shift
            out.append((start, start + len(m["content"])))
            pieces.append(m["content"])
            pos = at + len(_MARK.format(i))
            shift += len(m["content"]) - len(_MARK.format(i))
        if len(out) == len(messages) and "".join(pieces) + mtext[pos:] == text:
            return out
        out, pos = [], 0  # the template changes what it shows of a message: find each in order
        for i, m in enumerate(messages):
            body = m["content"] if m["content"] in text[pos:] else m["content"].strip()
            at = text.find(body, pos)
            if at < 0:
                raise ValueError(f"chat template does not show message {i} ({m['role']}) as written; "
                                 f"cannot place its loss mask")
            out.append((at, at + len(body)))
            pos = at + len(body)
        return out

    def render(self, tok, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation for ``tok`` (see the module docstring)."""
        text = self.render_text(messages, add_generation_prompt)
        spans = self.spans(messages, text, add_generation_prompt)
        ids, pos = [], 0
        specials = set()  # where in ids the template's own special tokens sit

        def encode_piece(end: int):
            nonlocal pos
            if end > pos:
                ids.extend(tok.hf.encode(text[pos:end], add_special_tokens=False).ids)
            pos = end

        inside = lambda at: any(a <= at < b for a, b in spans)  # noqa: E731
        for match in tok.special_pattern.finditer(text):
            a, b = match.span()
            if inside(a):  # spelled by a message: stays text, cut after its first character
                encode_piece(a + 1)
                continue
            encode_piece(a)
            specials.add(len(ids))
            ids.append(tok.hf.token_to_id(match.group()))
            pos = b
        encode_piece(len(text))
        return ids, self._mask(tok, ids, specials, text, spans, messages)

    @staticmethod
    def _mask(tok, ids, specials, text, spans, messages) -> list[int]:
        # byte offsets: byte-level BPE is lossless, so each token's bytes follow the last one's
        raw = text.encode("utf-8")
        tb = tok.token_bytes
        ends, n = [], 0
        for i in ids:
            n += len(tb[i])
            ends.append(n)
        if n != len(raw):
            raise ValueError("tokenizer does not reproduce the rendered chat byte for byte (not byte-level BPE?)")
        to_bytes = lambda c: len(text[:c].encode("utf-8"))  # noqa: E731
        mask = [0] * len(ids)
        for (a, b), m in zip(spans, messages):
            if m["role"] != "assistant":
                continue
            a, b = to_bytes(a), to_bytes(b)
            k = 0
            while k < len(ids) and ends[k] <= a:  # first token that ends inside or after the content
                k += 1
            while k < len(ids) and ends[k] - len(tb[ids[k]]) < b:
                mask[k] = 1
                k += 1
            while k < len(ids) and k not in specials:  # template text between content and end token
                k += 1
            if k < len(ids):
                mask[k] = 1
        return mask


def special_pattern(strings) -> re.Pattern:
    """Matches any of ``strings``, the longest first (so ``<|im_start|>`` wins over a prefix of it)."""
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))
