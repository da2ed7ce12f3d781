"""Serving: the continuous-batching scheduler, and the OpenAI-compatible server driven by the official
``openai`` SDK against a real uvicorn server on 127.0.0.1 (tiny random model, tokenizer trained here)."""
import http.client
import json
import sqlite3
import threading
import time
import urllib.request

import pytest
import torch

from chatfactory.inference.batching import Request, Scheduler
from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.serve.detokenize import Detokenizer
from chatfactory.text.tokenizer import Tokenizer
from conftest import TEXT, make_run, post, serve_subprocess

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_run):
    """One server for the module's SDK tests: the tiny run's sft stage and an openai client of it."""
    url, svc, _ = serve_run(make_run(tmp_path_factory.mktemp("serve") / "tiny"))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    return svc, url, client


# ---------------------------------------------------------------- the scheduler

@pytest.mark.parametrize("flavour", ["gpt2", "modern"])
def test_continuous_batching_equals_one_by_one(flavour):
    """Requests that join a running batch at different steps, with different prompt lengths and fewer
    slots than requests, get exactly the tokens each would get alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(flavour=flavour, depth=2, n_embd=64, head_dim=16, vocab_size=97, block_size=64,
                          n_kv_head=2 if flavour == "modern" else 0))
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [3] * 20, [9, 8], [11] * 7]
    p = SamplingParams(max_tokens=12, temperature=0)
    alone = [Engine(model).generate([x], p)[0] for x in prompts]
    sched = Scheduler(model, slots=3, start=False)
    outs = [[] for _ in prompts]
    finish = {}

    def request(i, params=p):
        def emit(st):
            if st.token is not None:
                outs[i].append(st.token)
            if st.finish:
                finish[i] = st.finish
        return sched.submit(Request(prompts[i], params, emit))

    request(0)
    sched.step()
    sched.step()
    request(1)  # joins while row 0 is mid-generation
    sched.step()
    for i in range(2, 6):
        request(i)  # more than the free slots: they wait and take slots as rows finish
    sched.run_until_idle()
    assert outs == alone  # ids: any host, barring a near tie within round-off (test_engine.py's rule)
    assert sched.max_batch == 3 and finish == {i: "length" for i in range(6)}
    assert sched.active() == 0 and sum(sched.cache.lengths) == 0
    # a stop id ends a row (the stop id is its last token)
    stop = alone[1][3]
    outs[1].clear()
    request(1, SamplingParams(max_tokens=12, temperature=0, stop_ids=(stop,)))
    sched.run_until_idle()
    assert outs[1] == alone[1][: alone[1].index(stop) + 1] and finish[1] == "stop"


def test_cancel_frees_the_slot_for_the_next_request():
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=1, n_embd=64, head_dim=32, vocab_size=97, block_size=64))
    sched = Scheduler(model, slots=1, start=False)
    got = {"a": [], "b": []}
    a = sched.submit(Request([1, 2, 3], SamplingParams(max_tokens=50), lambda st: got["a"].append(st)))
    b = sched.submit(Request([4, 5], SamplingParams(max_tokens=5, seed=1), lambda st: got["b"].append(st)))
    for _ in range(4):
        sched.step()
    assert len(got["a"]) == 4 and not got["b"]  # one slot: b waits behind a
    a.cancel()  # the client went away
    sched.step()
    assert got["a"][-1].finish == "cancelled" and len(got["a"]) == 5
    assert b.slot == 0 and len(got["b"]) == 1  # b took the freed slot in the same iteration
    sched.run_until_idle()
    assert got["b"][-1].finish == "length" and len(got["b"]) == 5


def test_a_full_queue_answers_429(tmp_path, serve_run):
    url, svc, _ = serve_run(make_run(tmp_path / "busy"),
                            scheduler=lambda svc: Scheduler(svc.model, slots=1, max_waiting=1, start=False))
    stuck = svc.scheduler  # nothing drains it
    msg = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2}
    status, err = post(url, "/v1/chat/completions", msg)
    assert status == 429 and err["error"]["type"] == "rate_limit_error"
    assert not stuck.waiting  # the half-submitted request was withdrawn, and left the queue


def test_detokenizer_holds_back_and_cuts_at_stop_strings():
    tok = Tokenizer.train(TEXT, vocab_size=300)
    d = Detokenizer(tok, ["lazy"])
    ids = tok.encode("the quick brown fox jumps over the lazy dog")
    pieces = [d.add(t) for t in ids]
    assert "".join(pieces) == "the quick brown fox jumps over the " and d.stopped
    d = Detokenizer(tok, [])
    text = "héllo 世界 🙂"
    assert "".join(d.add(t) for t in tok.encode(text)) + d.add(None, final=True) == text  # whole characters only


# ---------------------------------------------------------------- the server through the openai SDK

def greedy_reference(svc, messages, max_tokens):
    ids = svc.tok.chat_prompt(messages)
    p = SamplingParams(max_tokens=max_tokens, temperature=0, stop_ids=svc.stop_ids)
    # the server never samples ids the tokenizer cannot spell: mask them the same way here
    model = svc.model
    out = []
    with torch.no_grad():
        x = torch.tensor([ids])
        for _ in range(max_tokens):
            logits = model(x)[0, -1]
            logits[svc.tok.vocab_size:] = float("-inf")
            t = int(logits.argmax())
            out.append(t)
            if t in p.stop_ids:
                break
            x = torch.cat([x, torch.tensor([[t]])], 1)
    return out


def test_openai_sdk_chat_stream_and_non_stream(server):
    svc, url, client = server
    (card,) = client.models.list().data
    # extra fields, as vLLM's max_model_len
    assert card.id == svc.name and (card.precision, card.memory) == ("float32", "resident")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    ref = greedy_reference(svc, msgs, 20)
    ref_text = svc.tok.decode([t for t in ref if t not in svc.stop_ids])

    r = client.chat.completions.create(model=svc.name, messages=msgs, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref_text
    assert r.choices[0].finish_reason == ("stop" if ref[-1] in svc.stop_ids else "length")
    assert r.usage.prompt_tokens == len(svc.tok.chat_prompt(msgs)) and r.usage.completion_tokens == len(ref)

    real_step = svc.scheduler.step

    def paced_step():  # 5 ms a step, so the stream is seen in pieces however loaded the machine is
        time.sleep(0.005)
        real_step()
    svc.scheduler.step = paced_step
    try:
        chunks = list(client.chat.completions.create(model=svc.name, messages=msgs, max_tokens=20, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    finally:
        svc.scheduler.step = real_step
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == ref_text and sum(bool(d) for d in deltas) > 3  # many pieces, not one blob
    assert chunks[-1].usage.completion_tokens == len(ref)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]

    lp = client.chat.completions.create(model=svc.name, messages=msgs, max_tokens=20, temperature=0, logprobs=True,
                                        top_logprobs=2).choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in lp).decode("utf-8", "replace") == ref_text  # one entry per content token
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) and len(t.top_logprobs) == 2
               for t in lp)  # greedy = top-1

    # n=2 with a seed: two different samples, the same two again for the same seed; extra keys (top_k) accepted
    kw = dict(model=svc.name, messages=msgs, max_tokens=12, temperature=1.0, n=2, seed=7, extra_body={"top_k": 50})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1] and texts[0] != texts[1]
    assert texts == [c.message.content for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 24 and a.usage.prompt_tokens == len(svc.tok.chat_prompt(msgs))
    streamed = ["", ""]
    for c in client.chat.completions.create(**kw, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == texts  # streaming and the batch agree, row by row

    # stop: a string from the greedy answer ends it just before, finish_reason "stop"
    full = client.chat.completions.create(model=svc.name, messages=msgs, max_tokens=40,
                                          temperature=0).choices[0].message.content
    cut = full[5:8]
    assert cut and len(full) > 8
    s = client.chat.completions.create(model=svc.name, messages=msgs, max_tokens=40, temperature=0, stop=[cut, "zzz"])
    assert s.choices[0].message.content == full[: full.index(cut)] and s.choices[0].finish_reason == "stop"
    ss = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=svc.name, messages=msgs, max_tokens=40, temperature=0, stop=cut, stream=True) if c.choices)
    assert ss == full[: full.index(cut)]


def test_ignore_eos_generates_to_max_tokens(server):
    """``ignore_eos`` (vLLM's and llama.cpp's extension, for benchmarks): a reply that would end at the
    end-of-turn token goes on to max_tokens, its first tokens the same."""
    svc, url, client = server
    asks = [[{"role": "user", "content": w}] for w in ("hello world", "hi", "the", "a b c", "hello", "world")]
    msgs, ref = next(((m, r) for m in asks if (r := greedy_reference(svc, m, 40))[-1] in svc.stop_ids), (None, None))
    assert msgs is not None, "the tiny model ended none of these replies: nothing to ignore"
    plain = client.chat.completions.create(model=svc.name, messages=msgs, max_tokens=40, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens == len(ref) < 40
    r = client.chat.completions.create(model=svc.name, messages=msgs, max_tokens=40, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 40
    assert r.choices[0].message.content.startswith(plain.choices[0].message.content)


def test_completions_logprobs_echo_score_the_prompt(server):
    """What evaluation harnesses need: echo + logprobs with max_tokens=0 gives each prompt token's
    log-probability (the first is null), equal to the model's own."""
    svc, url, client = server
    text = "the quick brown fox"
    r = client.completions.create(model=svc.name, prompt=text, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    ids = svc.tok.encode(text)
    assert r.choices[0].text == text and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert lp.text_offset == [len(svc.tok.decode(ids[:i])) for i in range(len(ids))]
    with torch.no_grad():
        x = torch.tensor([[svc.tok.bos_id] + ids])
        logp = torch.log_softmax(svc.model(x)[0, :-1, : svc.tok.vocab_size], -1)
    want = [float(logp[i, x[0, i + 1]]) for i in range(len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
    # two alternatives each (fewer only where two ids decode to the same string: a dict key collision)
    assert all(1 <= len(t) <= 2 and max(t.values()) >= v - 1e-6
               for t, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))

    # lm-eval's local-completions: token-id prompts in a batch, echo, max_tokens=1, logprobs=1
    r = client.completions.create(model=svc.name, prompt=[ids, ids[:2]], max_tokens=1, echo=True, logprobs=1,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    c0 = r.choices[0].logprobs
    assert len(c0.tokens) == len(ids) + 1 and c0.token_logprobs[1:len(ids)] == pytest.approx(want[1:], abs=1e-4)
    # greedy: the generated token is the most likely one
    assert c0.token_logprobs[-1] == pytest.approx(max(c0.top_logprobs[-1].values()), abs=1e-5)

    # streaming completions, n=2: the same text as without streaming, one finish_reason per answer
    kw = dict(model=svc.name, prompt=text, max_tokens=12, temperature=0, n=2)
    plain = client.completions.create(**kw)
    got, finishes = ["", ""], []
    for chunk in client.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            got[ch.index] += ch.text
            if ch.finish_reason:
                finishes.append((ch.index, ch.finish_reason))
    assert got == [c.text for c in plain.choices] and \
        sorted(finishes) == [(c.index, c.finish_reason) for c in plain.choices]

    # plain generation with logprobs
    g = client.completions.create(model=svc.name, prompt=text, max_tokens=5, logprobs=0, temperature=0)
    assert len(g.choices[0].logprobs.token_logprobs) == g.usage.completion_tokens  # a generated stop id is listed too
    # a token that is part of a character is named by its bytes ("bytes:\\xe4\\xbd"), never U+FFFD
    spelled = b"".join(bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
                       for t in g.choices[0].logprobs.tokens)
    assert spelled.decode("utf-8", "replace").startswith(g.choices[0].text)


def test_lm_eval_local_completions_scores_through_the_server(server):
    """lm-eval's own `local-completions` client, unchanged: it finds the tokenizer endpoints by itself
    and its log-likelihoods equal the model's."""
    oc = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance

    svc, url, client = server
    lm = oc.LocalCompletionsAPI(base_url=url + "/v1/completions", model=svc.name, max_length=svc.block_size,
                                max_retries=1)
    assert lm.tokenizer_backend == "remote"
    pairs = [("the quick brown", " fox jumps"), ("def add(x, y):", "\n    return x + y")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c_ids = svc.tok.encode(ctx)
        whole = svc.tok.encode(ctx + cont)
        assert whole[: len(c_ids)] == c_ids
        with torch.no_grad():
            x = torch.tensor([[svc.tok.bos_id] + whole])
            logp = torch.log_softmax(svc.model(x)[0, :-1, : svc.tok.vocab_size], -1)
        span = range(len(c_ids), len(whole))  # logp[i] predicts whole[i] (after the <|bos|>)
        want = sum(float(logp[i, whole[i]]) for i in span)
        assert ll == pytest.approx(want, abs=1e-3) and ll < 0
        assert greedy == all(int(logp[i].argmax()) == whole[i] for i in span)
    assert client.completions.create(model=svc.name, prompt="x", max_tokens=1)  # the server is fine after


def _ctx_overflow(svc):
    return {"messages": [{"role": "user", "content": "hello world " * 200}]}


BAD = [  # (what, body or raw bytes, expected status, expected error code)
    ("malformed JSON", b'{"messages": [', 400, "invalid_json"),
    ("body not an object", b"[1, 2]", 400, "invalid_json"),
    ("no messages", {"model": None}, 400, "missing"),
    ("empty messages", {"messages": []}, 400, "invalid_value"),
    ("messages not a list", {"messages": "hi"}, 400, "invalid_type"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    ("system not first", {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     400, "invalid_value"),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type"),
    ("message not an object", {"messages": ["hi"]}, 400, "invalid_type"),
    ("temperature of the wrong type", {"messages": [{"role": "user", "content": "a"}], "temperature": "hot"},
     400, "invalid_type"),
    ("temperature out of range", {"messages": [{"role": "user", "content": "a"}], "temperature": 7},
     400, "invalid_value"),
    ("top_p out of range", {"messages": [{"role": "user", "content": "a"}], "top_p": 0}, 400, "invalid_value"),
    ("max_tokens negative", {"messages": [{"role": "user", "content": "a"}], "max_tokens": -1}, 400, "invalid_value"),
    ("max_tokens a boolean", {"messages": [{"role": "user", "content": "a"}], "max_tokens": True}, 400, "invalid_type"),
    ("n too large", {"messages": [{"role": "user", "content": "a"}], "n": 100}, 400, "invalid_value"),
    ("stop not strings", {"messages": [{"role": "user", "content": "a"}], "stop": [1]}, 400, "invalid_type"),
    ("too many stops", {"messages": [{"role": "user", "content": "a"}], "stop": list("abcde")}, 400, "invalid_value"),
    ("prompt too long for the context", "ctx", 400, "context_length_exceeded"),
    ("max_tokens past the context", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 10_000},
     400, "context_length_exceeded"),
    ("too many messages", {"messages": [{"role": "user", "content": "a"}] * 300}, 400, "too_many_messages"),
    ("message too long", {"messages": [{"role": "user", "content": "a" * 40_000}]}, 400, "message_too_long"),
    ("body too large", b'{"messages": "' + b"a" * 1_100_000 + b'"}', 413, "body_too_large"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "a"}]}, 404, "model_not_found"),
]


@pytest.mark.parametrize("what,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests_get_openai_errors(server, what, body, status, code):
    svc, url, client = server
    if body == "ctx":
        body = _ctx_overflow(svc)
    got, err = post(url, "/v1/chat/completions", body, raw=body if isinstance(body, bytes) else None)
    assert got == status, err
    assert set(err) == {"error"} and err["error"]["code"] == code and err["error"]["message"]
    assert err["error"]["type"] == ("invalid_request_error" if status in (400, 413) else "not_found_error")
    assert post(url, "/health", None)[0] == 200  # still up


def test_other_bad_requests_and_the_sdk_sees_them(server):
    svc, url, client = server
    cases = [("/v1/completions", {"prompt": [[1, 2, 99999]]}, 400), ("/v1/completions", {"prompt": 5}, 400),
             ("/v1/completions", {"prompt": "hi", "logprobs": 99}, 400),
             ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1, "stream": True}, 400),
             ("/v1/feedback", {"kind": "vote", "messages": [{"role": "user", "content": "a"}]}, 400),
             ("/v1/feedback", {"kind": "rating", "messages": [{"role": "user", "content": "a"}], "answer": "b",
                               "rating": 3}, 400),
             ("/tokenize", {"text": "no prompt key"}, 400), ("/detokenize", {"tokens": "abc"}, 400),
             ("/detokenize", {"tokens": [10 ** 9]}, 400), ("/v1/nothing-here", {}, 404)]
    for path, body, status in cases:
        got, err = post(url, path, body)
        assert got == status and "message" in err["error"], (path, body, err)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/v1/chat/completions")
    r = conn.getresponse()
    assert r.status == 405 and "error" in json.loads(r.read())
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=svc.name, messages=[{"role": "robot", "content": "x"}])
    assert client.chat.completions.create(model=svc.name, messages=[{"role": "user", "content": "a"}],
                                          max_tokens=2).choices


def test_api_key_is_required_when_set(tmp_path, serve_run):
    url = serve_run(make_run(tmp_path / "keyed"), api_key="s3cret", slots=2).url
    msg = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert post(url, "/v1/chat/completions", msg)[0] == 401
    status, err = post(url, "/v1/chat/completions", msg, headers={"Authorization": "Bearer wrong"})
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    assert post(url, "/v1/chat/completions", msg, headers={"Authorization": "Bearer s3cret"})[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0).models.list().data
    assert post(url, "/tokenize", {"prompt": "hi"})[0] == 401
    assert post(url, "/health", None)[0] == 200  # liveness stays open


def test_disconnected_stream_frees_its_slot(server):
    """A client that hangs up mid-stream stops costing decode steps: its request is cancelled."""
    svc, url, client = server
    sched = svc.scheduler
    seen, real_step, real_submit = [], sched.step, sched.submit_all

    def slow_step():  # ~20 ms a step, so the answer cannot finish before the client leaves
        time.sleep(0.02)
        real_step()

    def spy_submit(reqs):  # a request's generations go in as one group
        seen.extend(reqs)
        return real_submit(reqs)

    sched.step, sched.submit_all = slow_step, spy_submit
    try:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True, "temperature": 1.0,
             "logit_bias": None}), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        conn.sock.shutdown(2)
        conn.close()
        deadline = time.time() + 10
        while (sched.active() or not seen[0].finished) and time.time() < deadline:
            time.sleep(0.05)
        assert seen[0].finished and seen[0].cancelled and len(seen[0].generated) < 100
        assert post(url, "/health", None)[1]["active"] == 0
    finally:
        sched.step, sched.submit_all = real_step, real_submit


def test_concurrent_clients_share_decode_steps(server):
    svc, url, client = server
    sched = svc.scheduler
    before = sched.max_batch
    sched.max_batch = 0
    results = []
    real_step = sched.step

    def slow_step():  # 5 ms a step: requests overlap even on a fast, idle machine
        time.sleep(0.005)
        real_step()
    sched.step = slow_step

    def one(i):
        r = client.chat.completions.create(model=svc.name, messages=[{"role": "user", "content": f"hi {i}"}],
                                           max_tokens=60, temperature=1.0, seed=i)
        results.append(r.choices[0].message.content)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sched.step = real_step
    assert len(results) == 6 and sched.max_batch >= 2  # they were decoded together
    sched.max_batch = max(before, sched.max_batch)


def test_feedback_api_sqlite_and_export(server, tmp_path):
    svc, url, client = server
    conv = [{"role": "user", "content": "Say hi"}]
    assert post(url, "/v1/feedback", {"kind": "rating", "messages": conv, "answer": "Hi!", "rating": 1})[0] == 200
    assert post(url, "/v1/feedback", {"kind": "rating", "messages": conv, "answer": "Go away.", "rating": -1})[0] == 200
    status, r = post(url, "/v1/feedback", {"kind": "comparison", "messages": conv, "answers": ["Hey", "Hello there!"],
                                           "preferred": 1})
    assert status == 200 and r["object"] == "feedback" and r["id"] >= 3
    db = sqlite3.connect(svc.feedback.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = db.execute("SELECT kind, answer, answer_b, rating, preferred, model, stage FROM feedback "
                      "ORDER BY id").fetchall()
    db.close()
    assert ("rating", "Hi!", None, 1, None, svc.name, "sft") in rows
    assert ("comparison", "Hey", "Hello there!", None, 1, svc.name, "sft") in rows

    from chatfactory.cli import main

    out = tmp_path / "pairs.jsonl"
    assert main(["feedback", "export", "--run", str(svc.feedback.path.parent), "--out", str(out)]) == 0
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert {"prompt": conv, "chosen": "Hello there!", "rejected": "Hey"} in pairs
    assert {"prompt": conv, "chosen": "Hi!", "rejected": "Go away."} in pairs
    try:  # the reward/DPO loader reads the export as it is
        from chatfactory.data.preferences import load_comparisons
    except ImportError:
        return
    loaded = load_comparisons(str(out))
    assert {(p.chosen, p.rejected) for p in loaded} >= {("Hello there!", "Hey"), ("Hi!", "Go away.")}
    assert main(["feedback", "export", "--run", str(tmp_path / "nowhere")]) == 2  # a clear error, not a traceback


@pytest.mark.slow
def test_cli_serve_subprocess(tmp_path):
    """`chatfactory serve` as a user runs it: binds 127.0.0.1, needs the key, answers the SDK."""
    run = make_run(tmp_path / "cli")
    with serve_subprocess(run, "--api-key", "k1", "--slots", 4) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
        name = c.models.list().data[0].id
        assert name == "cli/sft"
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
        page = urllib.request.urlopen(url + "/", timeout=5)
        assert b"chatfactory" in page.read() and "script-src 'self'" in page.headers["Content-Security-Policy"]
