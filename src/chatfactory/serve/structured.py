"""Structured outputs and tool calls: what a chat request's ``response_format`` and ``tools`` ask of the reply,
as the grammar every one of its ``n`` answers is decoded under (inference/grammar.py), and the reply read
back as OpenAI's ``tool_calls``.

The tool-call format is Hermes' (the one Qwen's and NousResearch's templates use): optional text, then one
or more ``<tool_call>`` blocks, each a JSON object ``{"name": …, "arguments": {…}}`` followed by
``</tool_call>``. The templates of the models served here (ours, SmolLM2's) render no tools, so this server
tells the model about them itself (the generic fallback, as llama.cpp's server does for such templates):

- the tools (name, description, the JSON Schema of the arguments) and the format go into the system
  message (``TOOL_INSTRUCTION``, after the client's own system text); where that leaves the reply no room in
  the model's context (a demo-size model's 128 tokens), a brief one (``TOOL_INSTRUCTION_BRIEF``: names and
  argument names) takes its place (``too_long``), the grammar still holding every call to its schema and
  allowing it no layout beyond single spaces (``COMPACT_WHITESPACE``), so the call fits what is left;
- earlier assistant calls are written back in the format, and each ``role: tool`` result becomes a
  ``<tool_response>`` user message naming the function it answers;
- the reply is decoded under a grammar (``tool_grammar``): with ``tool_choice`` ``auto`` either plain text
  without the tag or text then calls; ``required`` one call or more, nothing else; a named function that
  one, once; ``parallel_tool_calls: false`` at most one call. Every call names a listed function and its
  arguments are valid under that function's schema.

``ToolCallParser`` reads the reply back, whole or as it streams: content before the first tag, then per
call its name once and its arguments in fragments (the raw JSON text the model wrote, so the joined
fragments equal the non-streamed ``arguments``). A reply that is not the format (cut by ``max_tokens``,
or malformed) is content, never an error.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from ..inference.grammar import JSON_WHITESPACE, Constraint, GrammarError, Grammars, bounded_integers
from .protocol import APIError, ChatCompletionRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOL_INSTRUCTION = (
    "You can call functions. Each is listed with what it does and the JSON Schema of its arguments:\n{tools}\n"
    "To call one, write {open} on its own line, then one line of JSON: {{\"name\": the function's name, "
    "\"arguments\": an object of its arguments}}, then {close}. Several calls may follow one another. Each "
    "result comes back to you in a <tool_response> message; answer the user with it. {when}")
# names and argument names only (the format's example alone would take half of a 128-token context): the grammar
# writes the format where a call is required or named; under "auto" such a model will mostly answer in text
TOOL_INSTRUCTION_BRIEF = "Functions: {tools}. {when}"
WHEN = {"auto": "When no function helps, answer in plain text.",
        "required": "Call at least one function now.",
        "named": "Call the function {name} now."}


# ---------------------------------------------------------------- response_format

def response_constraint(grammars: Grammars, req: ChatCompletionRequest,
                        compact: bool = False) -> Callable[[], Constraint] | None:
    """-> a function giving each answer its own constraint (None: the reply is free). Compiles once here,
    so a bad schema is refused (400) before anything is queued; each answer gets a fork of it. ``compact``:
    tool calls with at most one space between JSON tokens (a context with no room for layout)."""
    fmt, tools = req.response_format, active_tools(req)
    if tools and fmt is not None and fmt.type != "text":
        raise APIError(400, "response_format: this server cannot constrain a reply to both a JSON format and tool "
                            "calls; send one of them", "response_format", "invalid_value")
    if tools:
        constrained = tool_grammar(tools, req, grammars.tok.special, compact)
        param, build = "tools", lambda: grammars.lark(constrained, "tool_calls")
    elif fmt is None or fmt.type == "text":
        return None
    else:
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        param = "response_format.json_schema.schema" if fmt.type == "json_schema" else "response_format"
        build = lambda: grammars.json_schema(schema)  # noqa: E731
    if req.ignore_eos:
        raise APIError(400, f"ignore_eos: a reply under {param.split('.')[0]} ends when its grammar does; "
                            "ignore_eos cannot be true with it", "ignore_eos", "invalid_value")
    try:
        first = build()
    except GrammarError as e:
        raise APIError(400, f"{param}: the grammar library refuses this: {e}", param, "invalid_value") from None
    return first.fork


# ---------------------------------------------------------------- tools in, grammar

def active_tools(req: ChatCompletionRequest) -> list:
    """The tools this reply may call: those named by ``tool_choice`` (a named one: only it), none for "none"."""
    choice = req.tool_choice
    if choice is not None and not req.tools:
        raise APIError(400, "tool_choice: given without tools", "tool_choice", "invalid_value")
    if not req.tools or choice == "none":
        return []
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two tools share a name", "tools", "invalid_value")
    if isinstance(choice, str) or choice is None:
        return list(req.tools)
    picked = [t for t in req.tools if t.function.name == choice.function.name]
    if not picked:
        raise APIError(400, f"tool_choice: no tool is named {choice.function.name!r}", "tool_choice.function.name",
                       "invalid_value")
    return picked


COMPACT_WHITESPACE = r"\x20?"  # between JSON tokens of a call where the context is short: a space at most


def _call_schema(tools, compact: bool = False) -> dict:
    """One call as JSON: a listed function's name and arguments valid under its schema (integers bounded as
    response_format's are: grammar.bounded_integers)."""
    one = [{"type": "object",
            "properties": {"name": {"const": t.function.name},
                           "arguments": bounded_integers(t.function.parameters or {"type": "object"})},
            "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = one[0] if len(one) == 1 else {"anyOf": one}
    return {**schema, "x-guidance": {"whitespace_pattern": COMPACT_WHITESPACE if compact else JSON_WHITESPACE}}


def tool_grammar(tools, req: ChatCompletionRequest, special: dict[str, int] | None = None,
                 compact: bool = False) -> str:
    """The Lark grammar (llguidance's dialect) of a reply that may or must call ``tools``. ``special``: the
    tokenizer's added tokens; where the tags are among them (Qwen's), the grammar asks for those ids (the
    grammar library reads an added token as a token of its own, never as the text it spells)."""
    special = special or {}
    tag = {t: f"<[{special[t]}]>" if t in special else f'"{t}"' for t in (OPEN, CLOSE)}
    body = f'"\\n" %json {json.dumps(_call_schema(tools, compact))} "\\n" {tag[CLOSE]}'
    parallel = req.parallel_tool_calls is not False and not _named(req)
    more = f' more*\nmore: "\\n"? {tag[OPEN]} {body}' if parallel else ""
    text = f"TEXT: /(?s:.+)/ & ~/(?s:.*{OPEN}.*)/\n"  # plain text that does not spell the tag
    if req.tool_choice not in (None, "auto"):
        return f"start: {tag[OPEN]} {body}{more}\n"
    if OPEN in special:  # a special token ends the text by itself
        return f"start: TEXT | TEXT? {tag[OPEN]} {body}{more}\n{text}"
    # plain text without the tag, or text (maybe none) ending in the first tag: each one lexeme, so the lexer
    # never has to take back text it read as the reply to find the tag in it
    return (f"start: TEXT | TEXT_THEN_OPEN {body}{more}\n"
            f"TEXT_THEN_OPEN: /(?s:.*){OPEN}/ & ~/(?s:.*{OPEN}.+)/\n{text}")


def _named(req) -> bool:
    return req.tool_choice is not None and not isinstance(req.tool_choice, str)


def prompt_messages(req: ChatCompletionRequest, messages: list[dict], native: bool,
                    brief: bool = False) -> tuple[list[dict], dict]:
    """-> (the conversation to render, the template's extra variables) for a template that renders tools itself
    (``native``: the tools go to it as ``tools``, calls and results as messages, as transformers passes them)
    or one that does not (``tool_messages``: the server writes them in, ``brief``ly if asked)."""
    if not native:
        return tool_messages(req, messages, brief), {}
    names = {tc.id: tc.function.name for m in req.messages for tc in (m.tool_calls or [])}
    out = []
    for m, plain in zip(req.messages, messages):
        d = {**plain, "content": None if m.content is None else plain["content"]}
        if m.tool_calls:
            d["tool_calls"] = [{"id": tc.id, "type": "function",
                                "function": {"name": tc.function.name, "arguments": _arguments(tc)}}
                               for tc in m.tool_calls]
        if m.role == "tool":
            d.update(tool_call_id=m.tool_call_id, name=names.get(m.tool_call_id, ""))
        out.append(d)
    tools = [t.model_dump(exclude_none=True) for t in active_tools(req)]
    return out, ({"tools": tools} if tools else {})


def too_long(req: ChatCompletionRequest, prompt_len: int, block: int, native: bool) -> bool:
    """Whether the server's full description of the tools leaves the reply too little of the context: the
    tokens the request asks for, or else a quarter of the context (``tool_messages(brief=True)`` then)."""
    return not native and bool(active_tools(req)) and prompt_len + (req.asked_tokens()[1] or block // 4) > block


async def render_with_tools(req: ChatCompletionRequest, messages: list[dict], native: bool, block: int,
                            render) -> tuple[list[int], bool]:
    """-> (the prompt's token ids, brief): ``render(messages, options=…)`` (the server's chat rendering) of the
    conversation ``prompt_messages`` gives, the tools described briefly where in full they are ``too_long``
    (then their calls are best decoded compact: ``response_constraint(compact=brief)``)."""
    for brief in (False, True):
        msgs, variables = prompt_messages(req, messages, native, brief)
        prompt = await render(msgs, options={**(req.chat_template_kwargs or {}), **variables})
        if not too_long(req, len(prompt), block, native):
            break
    return prompt, brief


def tool_messages(req: ChatCompletionRequest, messages: list[dict], brief: bool = False) -> list[dict]:
    """The conversation as the template renders it: tool results and earlier calls written in the format,
    and the tools described in the system message when this reply may call them."""
    names = {tc.id: tc.function.name for m in req.messages for tc in (m.tool_calls or [])}
    out = []
    for m, plain in zip(req.messages, messages):
        if m.role == "tool":
            body = {"name": names.get(m.tool_call_id, ""), "content": m.text}
            out.append({"role": "user", "content": f"<tool_response>\n{json.dumps(body, ensure_ascii=False)}\n"
                                                   "</tool_response>"})
        elif m.tool_calls:
            calls = "\n".join(f"{OPEN}\n{_call_json(tc)}\n{CLOSE}" for tc in m.tool_calls)
            out.append({"role": "assistant", "content": (plain["content"] + "\n" if plain["content"] else "") + calls})
        else:
            out.append(plain)
    tools = active_tools(req)
    if tools:
        how = WHEN["named"].format(name=tools[0].function.name) if _named(req) else WHEN[req.tool_choice or "auto"]
        if brief:  # add(a, b), get_weather(city)
            listed = ", ".join(f"{t.function.name}({', '.join((t.function.parameters or {}).get('properties') or {})})"
                               for t in tools)
            text = TOOL_INSTRUCTION_BRIEF.format(tools=listed, when=how)
        else:
            listed = "\n".join(f"- {t.function.name}: {t.function.description or '(no description)'} Arguments: "
                               f"{json.dumps(t.function.parameters or {'type': 'object'}, ensure_ascii=False)}"
                               for t in tools)
            text = TOOL_INSTRUCTION.format(tools=listed, open=OPEN, close=CLOSE, when=how)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _arguments(tc):
    try:
        return json.loads(tc.function.arguments)
    except json.JSONDecodeError:
        return tc.function.arguments  # as the client sent it


def _call_json(tc) -> str:
    return json.dumps({"name": tc.function.name, "arguments": _arguments(tc)}, ensure_ascii=False)


# ---------------------------------------------------------------- the reply read back

def _string_end(s: str, i: int) -> int | None:
    """``s[i]`` opens a JSON string -> the index after its closing quote (None: not closed yet)."""
    j = i + 1
    while j < len(s):
        if s[j] == "\\":
            j += 2
            continue
        if s[j] == '"':
            return j + 1
        j += 1
    return None


def scan_call(s: str) -> dict:
    """One call's JSON object as far as it has arrived (``s`` starts at it, maybe after whitespace) ->
    {"name": str | None, "args": start | None, "args_end": end | None, "end": index after "}" | None,
    "bad": not an object}. A string value of "name" at the top level is the name; the raw span of
    "arguments" is what a client gets."""
    out = {"name": None, "args": None, "args_end": None, "end": None, "bad": False}
    i = len(s) - len(s.lstrip())
    if i < len(s) and s[i] != "{":
        out["bad"] = True
        return out
    depth, key, want_key = 0, None, True
    while i < len(s):
        c = s[i]
        if c == '"':
            j = _string_end(s, i)
            if j is None:
                return out
            text = json.loads(s[i:j])
            if depth == 1 and want_key:
                key = text
            elif depth == 1 and key == "name":
                out["name"] = text
            elif depth == 1 and key == "arguments":
                out["args"], out["args_end"] = i, j
            i = j
            continue
        if c in "{[":
            depth += 1
            if depth == 2 and key == "arguments" and out["args"] is None:
                out["args"] = i
        elif c in "}]":
            depth -= 1
            if depth == 1 and key == "arguments" and out["args_end"] is None:
                out["args_end"] = i + 1
            if depth == 0:
                out["end"] = i + 1
                return out
        elif depth == 1 and c == ":":
            want_key = False
        elif depth == 1 and c == ",":
            want_key = True
        i += 1
    return out


class ToolCallParser:
    """A reply in the tool-call format, fed as it arrives (``feed``) -> events for the client:
    ("content", text), ("call", index, id, name), ("args", index, fragment); ``finish`` at the end.
    ``content``/``calls`` hold the whole reply read back (``calls``: [{"id", "name", "arguments"}])."""

    def __init__(self, names: set[str]):
        self.names = names
        self.text, self.sent = "", 0  # the reply so far; how much of it is content already given out
        self.calls: list[dict] = []
        self.at: int | None = None  # where the current call's JSON starts (after its tag), None: in text
        self.args_sent = 0
        self.content = ""
        self.broken = False  # not the format after all: the whole reply is content

    def feed(self, delta: str) -> list[tuple]:
        self.text += delta
        return self._advance(final=False)

    def finish(self) -> list[tuple]:
        events = self._advance(final=True)
        incomplete = self.at is not None
        if (incomplete or self.broken) and not self.calls_done():
            # cut short or not the format: the client sees the reply as it was written, as content
            self.broken = True
            rest = self.text[self.sent:]
            self.sent, self.content = len(self.text), self.content + rest
            if rest:
                events.append(("content", rest))
        return events

    def calls_done(self) -> list[dict]:
        return [c for c in self.calls if c.get("done")]

    def _advance(self, final: bool) -> list[tuple]:
        events: list[tuple] = []
        while not self.broken:
            if self.at is None:  # in text: content up to a tag
                tag = self.text.find(OPEN, self.sent)
                if tag < 0:
                    end = len(self.text) if final else len(self.text) - _tag_prefix(self.text, self.sent)
                    if self.calls:  # after a call: only whitespace may come before the next one (or, at the
                        rest = self.text[self.sent:end].strip()  # end, the start of a tag max_tokens cut)
                        if rest and not (final and OPEN.startswith(rest)):
                            self.broken = True
                        break
                    if end > self.sent:
                        events.append(("content", self.text[self.sent:end]))
                        self.content += self.text[self.sent:end]
                        self.sent = end
                    break
                if tag > self.sent and not (self.calls and not self.text[self.sent:tag].strip()):
                    events.append(("content", self.text[self.sent:tag]))
                    self.content += self.text[self.sent:tag]
                self.at, self.sent, self.args_sent = tag + len(OPEN), tag + len(OPEN), 0
                self.calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "name": None, "arguments": "",
                                   "index": len(self.calls)})
                continue
            call, scan = self.calls[-1], scan_call(self.text[self.at:])
            if scan["bad"] or (scan["name"] is not None and scan["name"] not in self.names):
                self.broken = True
                break
            if scan["name"] is not None and call["name"] is None:
                call["name"] = scan["name"]
                events.append(("call", call["index"], call["id"], call["name"]))
            if call["name"] is not None and scan["args"] is not None:
                end = scan["args_end"] if scan["args_end"] is not None else len(self.text) - self.at
                frag = self.text[self.at + scan["args"] + self.args_sent:self.at + end]
                if frag:
                    events.append(("args", call["index"], frag))
                    call["arguments"] += frag
                    self.args_sent += len(frag)
            if scan["end"] is None:
                break
            close = self.text.find(CLOSE, self.at + scan["end"])
            if close < 0:
                if self.text[self.at + scan["end"]:].strip() and not CLOSE.startswith(
                        self.text[self.at + scan["end"]:].strip()[:len(CLOSE)]):
                    self.broken = True
                break
            if call["name"] is None or scan["args_end"] is None:
                self.broken = True
                break
            call["done"] = True
            self.at, self.sent = None, close + len(CLOSE)
        return events


def _tag_prefix(text: str, start: int) -> int:
    """How many characters at the end of ``text[start:]`` could be the start of the tag (held back)."""
    for k in range(min(len(OPEN) - 1, len(text) - start), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0


def read_reply(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """A whole reply -> (content or None, calls): what a non-streamed answer holds."""
    p = ToolCallParser(names)
    p.feed(text)
    p.finish()
    calls = [] if p.broken else p.calls_done()
    content = text if p.broken else p.content
    return (content if content.strip() or not calls else None), calls


def chat_message(text: str, why: str, names: set[str]) -> dict:
    """A finished answer's text and finish reason -> {"message", "finish_reason"}: with tools (``names``), the
    calls read back from the text, and "tool_calls" for an answer that ended by calling."""
    if not names:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": why}
    content, calls = read_reply(text, names)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"id": k["id"], "type": "function",
                                  "function": {"name": k["name"], "arguments": k["arguments"]}} for k in calls]
    return {"message": message, "finish_reason": "tool_calls" if calls and why == "stop" else why}


def tool_deltas(events) -> list[dict]:
    """``ToolCallParser`` events -> chat deltas (OpenAI's contract): content; a call's index, id, type and name
    once; then its argument fragments, each in a ``function`` object with the call's index."""
    out = []
    for e in events:
        if e[0] == "content":
            out.append({"content": e[1]})
        elif e[0] == "call":
            out.append({"tool_calls": [{"index": e[1], "id": e[2], "type": "function",
                                        "function": {"name": e[3], "arguments": ""}}]})
        else:
            out.append({"tool_calls": [{"index": e[1], "function": {"arguments": e[2]}}]})
    return out
