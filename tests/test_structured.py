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
    url, svc, _ = serve_run(make_run(tmp_path_factory.mktemp("structured") / "tiny", block=1024))
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
