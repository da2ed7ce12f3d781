"""The server's OpenAPI schema (/openapi.json) describes every endpoint as it really behaves, and the
bugs that fuzzing it (bench/fuzz_and_soak.py) found stay fixed. Real uvicorn servers on 127.0.0.1,
tiny random models whose vocabulary is padded past the tokenizer's (as an imported model's often is)."""
import threading
import time

import pytest
from fastapi.routing import APIRoute

from conftest import make_run, post


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve_run):
    url, svc, app = serve_run(make_run(tmp_path_factory.mktemp("schema") / "s"), slots=4)
    return svc, app, url


def resolve(doc, ref):
    assert ref.startswith("#/components/schemas/"), ref
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_the_schema_documents_every_endpoint_its_body_and_its_errors(served):
    svc, app, url = served
    status, doc = post(url, "/openapi.json", None)
    assert status == 200 and doc["openapi"].startswith("3.")
    routes = {(m, r.path) for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema for m in r.methods}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == routes and len(routes) >= 10  # chat, completions, models, feedback, health, tokenizer, UI...
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "200" in codes and "403" in codes and "422" not in codes, (path, codes)  # never FastAPI's 422
            for code, r in op["responses"].items():
                if code != "200":
                    assert r["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), (path, code)
            if method == "post":  # a JSON body, described in components, and the errors a body can get
                body = op["requestBody"]
                assert body["required"] and list(body["content"]) == ["application/json"]
                target = resolve(doc, body["content"]["application/json"]["schema"]["$ref"])
                assert target.get("properties") or target.get("oneOf") or target.get("anyOf"), path
                assert {"400", "401", "404", "413", "415"} <= codes, (path, codes)
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"429", "500"} <= set(chat)
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    event = chat["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
    assert ({"const": "[DONE]"} in event
            and any(e.get("contentSchema", {}).get("$ref", "").endswith("/ChatCompletionChunk") for e in event))

    # narrowed to this server: its model id, context and vocabulary; a system message first or not at all
    req = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert req["model"]["anyOf"][0]["enum"] == [svc.name]
    assert req["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": svc.block_size - 1}
    assert req["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 2}
    assert req["messages"]["prefixItems"] == [{"$ref": "#/components/schemas/ChatMessage"}]
    assert resolve(doc, req["messages"]["items"]["$ref"])["properties"]["role"]["enum"] == ["user", "assistant", "tool"]
    ids = doc["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert (ids["minimum"], ids["maximum"]) == (0, svc.tok.vocab_size - 1) < (0, svc.model.cfg.vocab_size - 1)
    fb = doc["components"]["schemas"]["FeedbackRequest"]
    assert fb["discriminator"]["propertyName"] == "kind" and len(fb["oneOf"]) == 2
    assert doc["components"]["schemas"]["Health"]["required"] == ["status", "model", "active", "waiting", "slots",
                                                                  "cached_tokens", "prefix_cache_mb",
                                                                  "prefix_hit_tokens"]


def test_the_schema_agrees_with_the_server_on_sample_bodies(served):
    """Bodies the schema calls valid are accepted; ones it calls invalid get a 400 naming the field."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    svc, app, url = served
    doc = app.openapi()

    def valid(name, body):
        schema = {**doc["components"]["schemas"][name], "components": doc["components"]}  # so that its $refs resolve
        return jsonschema_rs.validator_for(schema).is_valid(body)

    msg = [{"role": "user", "content": "hi"}]
    cases = [  # (schema, path, body, accepted?, param named when refused)
        # 2.0 is an integer
        ("ChatCompletionRequest", "/v1/chat/completions", {"messages": msg, "max_tokens": 2.0}, True, None),
        ("ChatCompletionRequest", "/v1/chat/completions", {"messages": msg, "max_tokens": 2.5}, False, "max_tokens"),
        ("ChatCompletionRequest", "/v1/chat/completions", {"messages": msg, "n": True}, False, "n"),
        ("ChatCompletionRequest", "/v1/chat/completions", {"messages": msg + [{"role": "system", "content": "x"}]},
         False, "messages"),
        ("ChatCompletionRequest", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, False,
         "messages[0].content[0].type"),
        ("ChatCompletionRequest", "/v1/chat/completions", {"messages": msg, "model": "other"}, False, None),  # 404
        ("CompletionRequest", "/v1/completions", {"prompt": [1.0, 2], "max_tokens": 1}, True, None),
        ("CompletionRequest", "/v1/completions", {"prompt": [], "max_tokens": 1}, False, "prompt"),
        ("CompletionRequest", "/v1/completions", {"prompt": [[svc.tok.vocab_size]], "max_tokens": 1}, False, "prompt"),
        ("DetokenizeRequest", "/detokenize", {"tokens": [1, 2]}, True, None),
        ("FeedbackRequest", "/v1/feedback", {"kind": "rating", "messages": msg, "answer": "a", "rating": True},
         False, "rating"),
        ("FeedbackRequest", "/v1/feedback",
         {"kind": "comparison", "messages": msg, "answers": ["a", "b"], "preferred": 1.0}, True, None),
    ]
    for name, path, body, ok, param in cases:
        assert valid(name, body) == ok, (name, body)
        status, answer = post(url, path, body)
        assert (status == 200) == ok, (path, body, status, answer)
        if not ok and param:
            assert status == 400 and answer["error"]["param"] == param, (body, answer)


@pytest.mark.parametrize("temperature", [1e-117, 5e-324])
def test_a_temperature_too_small_for_float32_is_greedy_and_fails_nothing(served, temperature):
    """Found by fuzzing: the sampler divides float32 logits by the temperature, which rounds to 0 below
    float32's range: 0/0 = NaN, and an id past the vocabulary came out. The request got a 500 (no text
    for that id) and, unless its cancellation won the race, the next decode step read that id and failed
    every request in the batch. Such a temperature is greedy, and a request decoding beside it is fine."""
    svc, app, url = served
    msg = [{"role": "user", "content": "hello"}]
    long = {"messages": msg, "max_tokens": 120, "temperature": 0}
    _, alone = post(url, "/v1/chat/completions", long)
    assert alone["usage"]["completion_tokens"] == 120  # greedy here runs its whole length
    sched = svc.scheduler
    real_submit, busy = sched.submit_all, []

    def spy_submit(reqs):  # a request's generations go in as one group
        busy.append(sched.active())  # requests decoding when this one arrives
        return real_submit(reqs)

    sched.submit_all = spy_submit
    beside = {}
    t = threading.Thread(target=lambda: beside.update(r=post(url, "/v1/chat/completions", long)))
    try:
        t.start()
        while not busy and t.is_alive():
            time.sleep(0.001)
        time.sleep(0.01)
        status, tiny = post(url, "/v1/chat/completions", {"messages": msg, "max_tokens": 6, "temperature": temperature,
                                                          "top_p": 0.5, "n": 2})
        t.join(timeout=60)
    finally:
        sched.submit_all = real_submit
    assert status == 200, tiny
    greedy = alone["choices"][0]["message"]["content"]
    assert all(c["message"]["content"] and greedy.startswith(c["message"]["content"]) for c in tiny["choices"]), tiny
    status, r = beside["r"]
    # not failed, not changed (greedy ids decoded beside another request and alone: any host, barring a near tie)
    assert status == 200 and r["choices"] == alone["choices"], r
    if busy[1] == 0:
        pytest.skip("the long request had finished before the tiny one came (a very slow machine?)")
    assert post(url, "/health", None)[1]["active"] == 0


def test_prompt_token_ids_past_the_tokenizer_are_refused(served):
    """Found while narrowing the schema to the vocabulary: ids in the model's padding (no text) passed
    the check against the model's vocabulary and crashed echo and scoring with a 500."""
    svc, app, url = served
    pad = svc.tok.vocab_size + 5
    assert pad < svc.model.cfg.vocab_size  # a padded id: the model has a row for it, the tokenizer no text
    for body in ({"prompt": [[1, pad]], "echo": True, "logprobs": 1, "max_tokens": 0},
                 {"prompt": [1, pad], "echo": True, "max_tokens": 1}, {"prompt": [pad], "max_tokens": 1}):
        status, err = post(url, "/v1/completions", body)
        assert status == 400 and err["error"]["param"] == "prompt" and str(pad) in err["error"]["message"], (body, err)
    status, ok = post(url, "/v1/completions", {"prompt": [[1, svc.tok.vocab_size - 1]], "echo": True, "logprobs": 1,
                                               "max_tokens": 0})
    assert status == 200 and len(ok["choices"][0]["logprobs"]["tokens"]) == 2
