"""OpenAI's wire format as this server speaks it: request validation, the error shape, text out.

What a request may hold (``Limits``), how a bad one is refused (``APIError`` → OpenAI's error JSON with
a 4xx), how its fields are read and checked (``parse_*``), and how sampled ids become the text a client
sees (``Detokenizer``: whole characters, cut at stop strings; ``Choice``: one of ``n`` answers). No
HTTP and no model here: ``api.py`` wires these to FastAPI and the scheduler.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from ..batching import Request, Step
from ..tokenizer import ROLES, Tokenizer


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    max_message_chars: int = 32_000
    max_n: int = 8
    max_stop: int = 4
    max_prompts: int = 64  # prompts in one /v1/completions call
    max_logprobs: int = 20


class APIError(Exception):
    """Becomes OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- request validation

def parse_field(body: dict, key: str, types, default=None, *, check=None, why: str = ""):
    """body[key] if present and of the right JSON type (bool is never a number), else APIError 400."""
    v = body.get(key)
    if v is None:
        return default
    numeric = types in (int, float, (int, float))
    if (numeric and isinstance(v, bool)) or not isinstance(v, types if types is not float else (int, float)):
        names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list", dict: "an object"}
        raise APIError(400, f"'{key}' must be {names.get(types, 'a number')}, got {type(v).__name__}", key, "invalid_type")
    if check is not None and not check(v):
        raise APIError(400, f"'{key}' {why} (got {v!r})", key, "invalid_value")
    return v


def parse_stops(body: dict, lim: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > lim.max_stop:
        raise APIError(400, f"'stop' takes at most {lim.max_stop} sequences, got {len(stops)}", "stop", "invalid_value")
    return [s for s in stops if s]


def parse_sampling(body: dict, lim: Limits) -> dict:
    """The sampling settings shared by both completion endpoints (unknown extra keys are ignored).

    NaN and infinities fail every range check. Any temperature in (0, 2] is valid, tiny ones too
    (OpenAI accepts them; the sampler shifts logits by their maximum, so they sample greedily)."""
    top_k = parse_field(body, "top_k", int, 0, check=lambda v: v >= -1, why="must be >= 0 (0 or -1: off)")
    rep = parse_field(body, "repetition_penalty", float, 1.0, check=lambda v: 0 < v <= 10, why="must be in (0, 10]")
    return dict(
        temperature=float(parse_field(body, "temperature", float, 1.0, check=lambda v: 0 <= v <= 2, why="must be between 0 and 2")),
        top_p=float(parse_field(body, "top_p", float, 1.0, check=lambda v: 0 < v <= 1, why="must be in (0, 1]")),
        top_k=max(0, top_k), repetition_penalty=float(rep),
        # int64, as OpenAI documents it; sibling answers of n > 1 take seed + j, still in torch's range
        seed=parse_field(body, "seed", int, None, check=lambda v: -2**63 <= v < 2**63, why="must be a 64-bit signed integer"),
        n=parse_field(body, "n", int, 1, check=lambda v: 1 <= v <= lim.max_n, why=f"must be between 1 and {lim.max_n}"),
        stream=parse_field(body, "stream", bool, False),
        stop=parse_stops(body, lim),
    )


def parse_content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, list):  # OpenAI's content parts: only text parts can mean anything to this model
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            raise APIError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content", "invalid_value")
        return "".join(p["text"] for p in c)
    if not isinstance(c, str):
        raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_type")
    return c


def parse_messages(body: dict, lim: Limits) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise APIError(400, "'messages' is required and must be a list", "messages", "invalid_type" if msgs is not None else "missing")
    if not msgs:
        raise APIError(400, "'messages' must not be empty", "messages", "invalid_value")
    if len(msgs) > lim.max_messages:
        raise APIError(400, f"'messages' has {len(msgs)} entries; the limit is {lim.max_messages}", "messages", "too_many_messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})",
                           f"messages[{i}].role", "invalid_value")
        if role == "system" and i != 0:
            raise APIError(400, f"messages[{i}]: a system message may only come first", f"messages[{i}].role", "invalid_value")
        text = parse_content(m, i)
        if len(text) > lim.max_message_chars:
            raise APIError(400, f"messages[{i}].content has {len(text)} characters; the limit is {lim.max_message_chars}",
                           f"messages[{i}].content", "message_too_long")
        out.append({"role": role, "content": text})
    return out


def parse_max_tokens(body: dict, prompt_len: int, block: int, default: int | None, allow_zero: bool = False) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    lo = 0 if allow_zero else 1
    asked = parse_field(body, key, int, None, check=lambda v: v >= lo, why=f"must be >= {lo}")
    if prompt_len >= block:
        raise APIError(400, f"This model's maximum context length is {block} tokens; the prompt has {prompt_len}.",
                       "messages" if "messages" in body else "prompt", "context_length_exceeded")
    room = block - prompt_len
    if asked is None:
        return min(default, room) if default is not None else room
    if asked > room:
        raise APIError(400, f"This model's maximum context length is {block} tokens. However, you requested "
                       f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion).",
                       key, "context_length_exceeded")
    return asked


# ---------------------------------------------------------------- text out

class Detokenizer:
    """Token ids -> text deltas, whole characters only, cut at the first stop string.

    Text that could still turn out to be the start of a stop string is held back until it cannot."""

    def __init__(self, tok: Tokenizer, stops: list[str]):
        self.tok, self.stops = tok, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int | None, final: bool = False) -> str:
        if self.stopped:
            return ""
        if token is not None:
            self.text += self.utf8.decode(self.tok.decode_bytes([token]))
        if final:
            self.text += self.utf8.decode(b"", final=True)
        cut = min((i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
        end = len(self.text) if (final or self.stopped) else len(self.text) - self.hold
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out


class Choice:
    """One sampled answer being collected (one of ``n``)."""

    def __init__(self, index: int, tok: Tokenizer, stops: list[str], stop_ids: tuple[int, ...]):
        self.index, self.tok, self.stop_ids = index, tok, stop_ids
        self.detok = Detokenizer(tok, stops)
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float | None, list | None]] = []
        self.finish: str | None = None
        self.req: Request | None = None

    def feed(self, step: Step) -> str:
        """Take the scheduler's Step -> new text for the client ('' if none yet)."""
        text = ""
        if step.token is not None:
            self.tokens.append(step.token)
            self.logprobs.append((step.token, step.logprob, step.top))  # a stop id too, as OpenAI lists it
            if step.token not in self.stop_ids:
                text = self.detok.add(step.token)
        if self.detok.stopped:  # a stop string: the rest of this answer is not wanted
            self.finish = "stop"
            if self.req is not None:
                self.req.cancel()
        elif step.finish:
            text += self.detok.add(None, final=True)
            self.finish = step.finish
            if self.detok.stopped:
                self.finish = "stop"
        return text
