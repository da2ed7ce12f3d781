"""Structured outputs through the real server (uvicorn on 127.0.0.1) and the openai SDK: nothing a client
sends is dropped silently (unknown keys and unimplemented values are 400s naming them; habitual defaults
pass), and ``response_format`` json_object / json_schema replies are valid JSON from a random-init model
whose free replies are noise, streamed or not, ``n`` answers each its own grammar."""

import json

import jsonschema_rs
import pytest

from conftest import make_run, post

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

MSGS = [{"role": "user", "content": "Give me a person as JSON."}]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=150)
    member: bool


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_run):
    url, svc, _ = serve_run(make_run(tmp_path_factory.mktemp("structured") / "tiny", block=2048))
    return url, svc, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("extra, param, code", [
    ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
    ({"presence_penalty": -1.0}, "presence_penalty", "unsupported_parameter"),
    ({"logit_bias": {"5": 10.0}}, "logit_bias", "unsupported_parameter"),
    ({"store": True}, "store", "unsupported_parameter"),
    ({"response_format": {"type": "xml"}}, "response_format", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema", "invalid_value"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "invalid_value"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(server, extra, param, code):
    url, svc, _ = server
    status, body = post(url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 4, **extra})
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["code"] == code, body
    assert param.split(".")[0] in body["error"]["message"]


def test_habitual_defaults_are_accepted(server):
    url, svc, client = server
    r = client.chat.completions.create(
        model=svc.name, messages=MSGS, max_tokens=4, n=1, user="u-1", frequency_penalty=0, presence_penalty=0.0,
        logit_bias={}, store=False, metadata={"k": "v"}, service_tier="auto", stream_options=None,
        response_format={"type": "text"}, extra_body={"top_k": 5, "min_p": 0})
    assert r.choices[0].finish_reason in ("stop", "length")
    nulls = post(url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "reasoning_effort": None,
                                               "verbosity": None})  # null: not given, whatever the key
    assert nulls[0] == 200, nulls
    completions = post(url, "/v1/completions", {"prompt": "a", "max_tokens": 2, "user": "u", "frobnicate": 1})
    assert completions[0] == 400 and completions[1]["error"]["param"] == "frobnicate"


def test_json_object_replies_parse(server):
    url, svc, client = server
    stopped = 0
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model=svc.name, messages=MSGS, max_tokens=600, temperature=1.0, seed=seed,
                                           n=2, response_format={"type": "json_object"})
        for c in r.choices:
            if c.finish_reason == "stop":  # a complete object
                stopped += 1
                assert isinstance(json.loads(c.message.content), dict)
            else:  # any-JSON has no length bound: a random model's strings can run on to max_tokens
                assert c.finish_reason == "length" and c.message.content.lstrip().startswith("{")
    assert stopped >= 2


def test_json_schema_parse_and_stream(server):
    url, svc, client = server
    for seed in (4, 5):
        parsed = client.chat.completions.parse(model=svc.name, messages=MSGS, max_tokens=900, temperature=1.0,
                                               seed=seed, response_format=Person)
        person = parsed.choices[0].message.parsed
        assert isinstance(person, Person) and 0 <= person.age <= 150
    schema = Person.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    kw = dict(model=svc.name, messages=MSGS, max_tokens=900, temperature=1.0, seed=9, response_format=fmt,
              logprobs=True)
    whole = client.chat.completions.create(**kw)
    text = whole.choices[0].message.content
    jsonschema_rs.validate(schema, json.loads(text))
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
              if c.choices]
    assert "".join(pieces) == text and sum(bool(p) for p in pieces) > 3
    # log-probs of the masked distribution: no token the grammar forbade had any probability
    assert all(t.logprob <= 0 for t in whole.choices[0].logprobs.content)


# ---------------------------------------------------------------- tool calls
from chatfactory.serve.protocol import ChatCompletionRequest  # noqa: E402
from chatfactory.serve.structured import ToolCallParser, prompt_messages, read_reply, too_long, tool_messages  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
REPLY = ('Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": {"x": "}"}}}\n</tool_call>')


def _stream(parser, pieces):
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    calls: dict[int, dict] = {}
    for e in events:
        if e[0] == "call":
            assert e[1] not in calls, "a call's id and name come once"
            calls[e[1]] = {"id": e[2], "name": e[3], "arguments": ""}
        elif e[0] == "args":
            calls[e[1]]["arguments"] += e[2]
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, len(REPLY)])
def test_parser_streams_what_the_whole_reply_holds(split):
    """Tags and JSON split across pieces anywhere; text before a call; two calls; a brace inside a string."""
    names = {"get_weather", "add"}
    content, calls = read_reply(REPLY, names)
    assert content == "Let me look." and [c["name"] for c in calls] == ["get_weather", "add"]
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Oslo", "unit": "c"}, {"a": 1, "b": {"x": "}"}}]
    s_content, s_calls = _stream(ToolCallParser(names), [REPLY[i:i + split] for i in range(0, len(REPLY), split)])
    assert s_content == content
    assert [(c["name"], c["arguments"]) for c in s_calls] == [(c["name"], c["arguments"]) for c in calls]


def test_calls_before_a_cut_are_kept():
    """max_tokens cut a third call (or its tag): the two complete ones are the answer's calls."""
    two = REPLY + "\n"
    for cut in (two + "<tool", two + '<tool_call>\n{"name": "add", "argu'):
        content, calls = read_reply(cut, {"get_weather", "add"})
        assert content == "Let me look." and [c["name"] for c in calls] == ["get_weather", "add"]


@pytest.mark.parametrize("reply", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os',  # cut by max_tokens
    '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',  # not a listed function
    '<tool_call>\n[1, 2]\n</tool_call>',  # not an object
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call> and then some words',
    "a < b and <tool is not a tag",
])
def test_a_reply_not_in_the_format_is_content(reply):
    content, calls = read_reply(reply, {"get_weather", "add"})
    assert content == reply and calls == []
    s_content, _ = _stream(ToolCallParser({"get_weather", "add"}), list(reply))
    # streamed: what was not already sent as a call goes out as content when the reply turns out malformed
    assert s_content == reply if not reply.startswith("<tool_call>") else reply.endswith(s_content)


def _check_calls(calls, allowed):
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in allowed
        jsonschema_rs.validate(SCHEMAS[c.function.name], json.loads(c.function.arguments))


def test_tool_choices_through_the_openai_sdk(server):
    url, svc, client = server
    kw = dict(model=svc.name, messages=[{"role": "user", "content": "Weather in Oslo, and 2 + 3?"}], max_tokens=300,
              temperature=1.0, tools=[WEATHER, ADD])
    for seed in (1, 2, 3):
        r = client.chat.completions.create(**kw, seed=seed, tool_choice="required")
        c = r.choices[0]  # (a random model may go on calling until max_tokens: the complete calls are kept)
        assert c.finish_reason in ("tool_calls", "length") and c.message.tool_calls, c.message
        _check_calls(c.message.tool_calls, {"get_weather", "add"})
        named = client.chat.completions.create(**kw, seed=seed, tool_choice={"type": "function",
                                                                             "function": {"name": "add"}})
        calls = named.choices[0].message.tool_calls
        assert named.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        _check_calls(calls, {"add"})
        one = client.chat.completions.create(**kw, seed=seed, tool_choice="required", parallel_tool_calls=False)
        assert len(one.choices[0].message.tool_calls) == 1 and one.choices[0].finish_reason == "tool_calls"
    auto = client.chat.completions.create(**kw, seed=4, n=4)  # auto: text or calls, whichever, always well-formed
    for c in auto.choices:
        if c.message.tool_calls:
            _check_calls(c.message.tool_calls, {"get_weather", "add"})
        else:
            assert c.message.content and "<tool_call>" not in c.message.content
    none = client.chat.completions.create(**{**kw, "max_tokens": 20}, seed=5, tool_choice="none")
    assert none.choices[0].message.tool_calls is None


def test_streamed_tool_calls_follow_the_delta_contract(server):
    url, svc, client = server
    kw = dict(model=svc.name, messages=[{"role": "user", "content": "Weather?"}], max_tokens=300, temperature=1.0,
              tools=[WEATHER, ADD], tool_choice="required", seed=11, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                assert d.function is not None  # a function object in every tool delta
                if d.id is not None:
                    assert d.index not in calls and d.type == "function" and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]


def test_a_conversation_with_calls_and_results(server):
    url, svc, client = server
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model=svc.name, messages=msgs, max_tokens=5, tools=[ADD], tool_choice="none")
    assert r.choices[0].finish_reason in ("stop", "length")
    req = ChatCompletionRequest.model_validate({"messages": msgs, "tools": [ADD]})
    plain = [{"role": m["role"], "content": m["content"] or ""} for m in msgs]
    rendered = svc.tok.decode(svc.tok.chat_prompt(tool_messages(req, plain)))
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in rendered
    assert '<tool_response>\n{"name": "add", "content": "5"}\n</tool_response>' in rendered
    assert "add: Add two integers." in rendered and "Be brief." in rendered
    for bad, param in [({"role": "tool", "content": "5"}, "messages[1]"),
                       ({"role": "user", "content": None}, "messages[1]")]:
        status, body = post(url, "/v1/chat/completions", {"messages": [msgs[1], bad], "max_tokens": 2})
        assert status == 400 and body["error"]["param"].startswith(param), body
    status, body = post(url, "/v1/chat/completions", {"messages": msgs[1:2], "tool_choice": "auto"})
    assert status == 400 and body["error"]["param"] == "tool_choice"
    status, body = post(url, "/v1/chat/completions", {"messages": msgs[1:2], "tools": [ADD],
                                                      "tool_choice": {"type": "function", "function": {"name": "x"}}})
    assert status == 400 and body["error"]["param"] == "tool_choice.function.name"


# ---------------------------------------------------------------- a template that renders tools itself
TOOL_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{%- if tools %}{{ '<|system|>' }}{% if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}"
    "{% endif %}{{ 'You may call these functions:\\n' }}{% for t in tools %}{{ t | tojson + '\\n' }}{% endfor %}"
    "{{ 'To call one, write <tool_call>, a JSON object of name and arguments, and </tool_call>.<|end|>' }}"
    "{%- elif messages[0].role == 'system' %}{{ '<|system|>' + messages[0].content + '<|end|>' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.role == 'tool' %}{{ '<|user|><tool_response>\\n' + m.content + '\\n</tool_response><|end|>' }}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}{{ '<|assistant|>' }}{% if m.content %}{{ m.content }}"
    "{% endif %}{% for c in m.tool_calls %}{{ '<tool_call>\\n' + {'name': c.function.name, 'arguments': "
    "c.function.arguments} | tojson + '\\n</tool_call>' }}{% endfor %}{{ '<|end|>' }}"
    "{%- else %}{{ '<|' + m.role + '|>' + m.content + '<|end|>' }}{%- endif %}"
    "{%- endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, serve_run):
    """A run whose template renders tools (as Qwen's does) and whose tokenizer has the tags as added tokens."""
    from chatfactory.text.tokenizer import Tokenizer

    root = make_run(tmp_path_factory.mktemp("tooltpl") / "tpl", block=2048)
    tok = Tokenizer.load(root / "tokenizer.json")
    tok.hf.add_tokens(["<tool_call>", "</tool_call>"])  # added, not control tokens: as Qwen's tokenizer has them
    chat = {"chat_template": TOOL_TEMPLATE, "bos_token": "<|bos|>", "eos_token": "<|end|>", "pad_token": "<|pad|>",
            "add_bos_token": True}
    Tokenizer(tok.hf, chat).save(root / "tokenizer.json")
    url, svc, _ = serve_run(root)
    return url, svc, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_a_template_that_renders_tools_gets_them(tool_server):
    url, svc, client = tool_server
    assert svc.tok.template.supports_tools
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    req = ChatCompletionRequest.model_validate({"messages": msgs, "tools": [ADD]})
    plain = [{"role": m["role"], "content": m["content"] or ""} for m in msgs]
    rendered_msgs, variables = prompt_messages(req, plain, native=True)
    text = svc.tok.decode(svc.tok.chat_prompt(rendered_msgs, variables))
    assert json.dumps(ADD, ensure_ascii=False) in text and text.startswith("<|bos|><|system|>Be brief.")
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|end|>' in text
    assert "<|user|><tool_response>\n5\n</tool_response><|end|><|assistant|>" in text
    ids = svc.tok.chat_prompt(rendered_msgs, variables)
    assert svc.tok.special["<tool_call>"] in ids  # the template's tag is the added token, not spelled out
    assert svc.tok.special["<tool_call>"] not in svc.stop_ids  # a word of the reply, not its end

    for seed in (1, 2):
        r = client.chat.completions.create(model=svc.name, messages=msgs[:2], tools=[ADD, WEATHER], seed=seed,
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=300,
                                           temperature=1.0, logprobs=True)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c.message
        _check_calls(c.message.tool_calls, {"add", "get_weather"})
        # the call opened with the token the tokenizer has for the tag
        assert c.logprobs.content[0].token == "<tool_call>" and len(c.logprobs.content[0].bytes) == 11


def test_a_small_context_gets_the_tools_briefly(tmp_path, serve_run):
    """A model whose context cannot hold the tools' full description (the demo's is 128 tokens) gets the brief
    one (names and argument names): a request with tools is answered, not refused, and the grammar still holds
    each call to its schema; where the full one fits it is used."""
    url, svc, _ = serve_run(make_run(tmp_path / "small", block=512))
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    req = ChatCompletionRequest.model_validate({"messages": msgs, "tools": [WEATHER, ADD]})
    full, brief = (svc.tok.chat_prompt(tool_messages(req, msgs, brief=b)) for b in (False, True))
    assert too_long(req, len(full), 512, native=False) and not too_long(req, len(brief), 512, native=False)
    assert not too_long(req, len(full), 512, native=True)  # a template that renders tools is left to it
    text = svc.tok.decode(brief)
    assert "Functions: get_weather(city, unit), add(a, b)." in text and "Arguments:" not in text
    r = client.chat.completions.create(model=svc.name, messages=msgs, tools=[WEATHER, ADD], max_tokens=120, seed=3,
                                       temperature=1.0, tool_choice={"type": "function", "function": {"name": "add"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    _check_calls(c.message.tool_calls, {"add"})
    args = c.message.tool_calls[0].function.arguments  # the model's own text: compact, no layout
    assert "\n" not in args and "\t" not in args and "  " not in args, args
    named = ChatCompletionRequest.model_validate({"messages": msgs, "tools": [WEATHER, ADD], "tool_choice": {
        "type": "function", "function": {"name": "add"}}})
    assert r.usage.prompt_tokens == len(svc.tok.chat_prompt(tool_messages(named, msgs, brief=True)))
