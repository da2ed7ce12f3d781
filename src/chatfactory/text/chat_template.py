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

import re
from bisect import bisect_right
from itertools import accumulate

from .template_sandbox import TemplateBudgetError, TemplateLimits, compile_template, render

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
_RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token", "pad_token", "raise_exception")


def check_options(options: dict | None) -> dict:
    """A template's extra variables: names of letters, digits and _, values plain (bool, number, string, null);
    never one of the variables the renderer sets itself; ``tools`` may be a list of function descriptions
    (objects). ValueError naming what is wrong."""
    if not options:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"chat template options must be a mapping, got {type(options).__name__}")
    for k, v in options.items():
        if k == "tools" and isinstance(v, list) and all(isinstance(t, dict) for t in v):
            continue  # the functions a model may call, as transformers passes them (a template that renders them)
        if not isinstance(k, str) or not k.isidentifier() or k in _RESERVED:
            raise ValueError(f"chat template option {k!r} is not allowed (a name of letters, digits and _, "
                             f"not one of {', '.join(_RESERVED)})")
        if not (v is None or isinstance(v, (bool, int, float, str))):
            raise ValueError(f"chat template option {k!r} must be a bool, number, string or null, got "
                             f"{type(v).__name__}")
    return dict(options)


# what a template renders at load, to find one that is too slow or too big before any request meets it
_TRIAL = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye."}]


class ChatTemplate:
    """A Jinja chat template and the token strings it is rendered with, bounded by ``limits``."""

    @property
    def supports_tools(self) -> bool:
        """Does it render a ``tools`` variable and tool calls (Qwen's, Hermes'): then a conversation may hold
        ``role: tool`` messages and assistant messages with ``tool_calls`` and no content."""
        return "tools" in self.source and "tool_call" in self.source

    def __init__(self, source: str, limits: TemplateLimits | None = None, **tokens: str | None):
        self.source, self.limits = source, limits or TemplateLimits()
        self.tokens = {k: v for k, v in tokens.items() if v is not None}  # bos_token, eos_token, …
        # a broken template fails here, when the run is opened, not mid-training; so does one that breaks
        # its limits on a short conversation (one that refuses the conversation is fine: that is its right)
        compile_template(source, self.limits)
        try:
            self.render_text(_TRIAL, True)
        except TemplateBudgetError as e:
            raise TemplateBudgetError(f"chat template refused at load: rendering a {len(_TRIAL)}-message "
                                      f"conversation, {e}") from None
        except ValueError:
            pass

    def render_text(self, messages, add_generation_prompt: bool = False, options: dict | None = None) -> str:
        """The template's text for ``messages``, within ``limits`` (a TemplateBudgetError past them;
        text/template_sandbox.py). ``options``: more variables the template reads, as transformers'
        ``apply_chat_template(**kwargs)`` passes them (Qwen3's ``enable_thinking``)."""
        import jinja2

        options = check_options(options)
        try:
            return render(self.source, self.limits, **options, messages=messages,
                          add_generation_prompt=add_generation_prompt, **self.tokens)
        except TemplateBudgetError:
            raise
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template refused the conversation: {e}") from None
        except (RecursionError, MemoryError, ArithmeticError, TypeError, ValueError, LookupError,
                AttributeError) as e:  # the template's own bug, not the server's
            raise ValueError(f"chat template failed on the conversation: {type(e).__name__}: {e}") from None

    def spans(self, messages, text: str, add_generation_prompt: bool,
              options: dict | None = None) -> list[tuple[int, int]]:
        """Where each message's content lies in ``text`` (character offsets); every content a string."""
        marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
        mtext = self.render_text(marked, add_generation_prompt, options)
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

    def render(self, tok, messages, add_generation_prompt: bool = False,
               options: dict | None = None) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation for ``tok`` (see the module docstring); ``options``: ``render_text``'s."""
        text = self.render_text(messages, add_generation_prompt, options)
        # (an assistant message that only calls tools has no content: it is placed as empty text)
        messages = [m if isinstance(m.get("content"), str) else {**m, "content": ""} for m in messages]
        spans = self.spans(messages, text, add_generation_prompt, options)
        starts = [a for a, _ in spans]  # in order: each message's text follows the one before
        parts, pos = [], 0  # pieces of text, and between them the ids of the template's special tokens
        for match in tok.special_pattern.finditer(text):
            a, b = match.span()
            k = bisect_right(starts, a) - 1
            if k >= 0 and a < spans[k][1]:  # spelled by a message: stays text, cut after its first character
                parts.append(text[pos:a + 1])
                pos = a + 1
                continue
            parts += [text[pos:a], tok.hf.token_to_id(match.group())]
            pos = b
        parts.append(text[pos:])
        # each distinct piece encoded whole, once (a message spelling a special token 70,000 times makes two
        # pieces, 70,000 times over), in batches short enough to let other threads run between them
        distinct = list(dict.fromkeys(p for p in parts if isinstance(p, str) and p))
        piece_ids = {}
        for at in range(0, len(distinct), 1024):
            batch = distinct[at:at + 1024]
            piece_ids.update(zip(batch, (e.ids for e in tok.hf.encode_batch(batch, add_special_tokens=False))))
        ids, specials = [], set()  # specials: where in ids the template's own special tokens sit
        for p in parts:
            if isinstance(p, int):
                specials.add(len(ids))
                ids.append(p)
            elif p:
                ids.extend(piece_ids[p])
        return ids, self._mask(tok, ids, specials, text, spans, messages)

    @staticmethod
    def _mask(tok, ids, specials, text, spans, messages) -> list[int]:
        # byte offsets: byte-level BPE is lossless, so each token's bytes follow the last one's
        raw = text.encode("utf-8")
        tb = tok.token_bytes
        ends = list(accumulate(len(tb[i]) for i in ids))
        if (ends[-1] if ends else 0) != len(raw):
            raise ValueError("tokenizer does not reproduce the rendered chat byte for byte (not byte-level BPE?)")
        to_bytes = lambda c: len(text[:c].encode("utf-8"))  # noqa: E731
        mask = [0] * len(ids)
        for (a, b), m in zip(spans, messages):
            if m["role"] != "assistant":
                continue
            a, b = to_bytes(a), to_bytes(b)
            k = bisect_right(ends, a)  # the first token that ends inside or after the content
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
