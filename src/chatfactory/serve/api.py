"""An OpenAI-compatible HTTP server for a chatfactory run, with a web chat UI and feedback.

    chatfactory serve --run runs/NAME [--stage ppo] [--host 127.0.0.1 --port 8000 --api-key KEY]

Existing clients work unchanged (the ``openai`` SDK, chat front ends, evaluation harnesses)::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.chat.completions.create(model="NAME/sft", messages=[{"role": "user", "content": "Hi"}])

The request format, its checks and the error shape live in ``protocol.py``; this module is the HTTP
side. Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (stream via SSE), ``POST /v1/completions``
(``logprobs`` and ``echo``: with ``echo=true, max_tokens=0`` it scores the prompt, as lm-eval's
``local-completions`` needs), ``POST /v1/feedback`` (see serve/feedback.py), ``GET /health``, and the
web UI at ``/``. ``GET /openapi.json`` describes every endpoint: its request body (the pydantic models in
protocol.py, which also validate it) and each answer, errors included. Bad requests get OpenAI's error
JSON with a 4xx status; with ``--api-key`` every ``/v1/`` request needs ``Authorization: Bearer KEY``. Streamed
deltas hold whole characters only (text/tokenizer.py's ``TextStream``, through protocol.Detokenizer): a Chinese
character or emoji split across tokens waits for the token that completes it, and with ``logprobs`` the
entries of the tokens it waited for ride in that chunk. Generation goes through the continuous-batching
scheduler (inference/batching.py): concurrent requests share the model's decode steps, and a client that
disconnects frees its slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..text.tokenizer import TextStream
from .feedback import FeedbackFull, FeedbackStoreError
from .generation import Scoring, events, finish_reason, start, usage
from .guard import install_guards, read_body
from .limits import RateLimiter, WorkerPool, client_of, request_budget
from .openapi import API_DESCRIPTION, POST_ERRORS, STATIC, body_doc, build_openapi, doc, file_doc
from .protocol import (
    APIError,
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChat,
    parse_body,
    parse_feedback,
    parse_tokenize,
)
from .responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    DetokenizeResponse,
    FeedbackCreated,
    Health,
    ModelList,
    TokenizeResponse,
    TokenizerInfo,
)
from .service import Service

# ---------------------------------------------------------------- the app

log = logging.getLogger("chatfactory.serve")
RATER_COOKIE = "cf_rater"  # an opaque random id: who votes from this browser (feedback.py hashes it)
RATER_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}")  # what the server sets; anything else is no cookie


def set_rater_cookie(response: Response, request: HTTPRequest) -> None:
    """Give a browser without one its ``cf_rater``: random, unreadable by script, never sent by another site."""
    if not RATER_TOKEN.fullmatch(request.cookies.get(RATER_COOKIE, "")):
        response.set_cookie(RATER_COOKIE, secrets.token_urlsafe(18), max_age=365 * 86400, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")


def create_app(svc: Service, allow_origins=(), bind_host: str | None = None):
    """The FastAPI app serving ``svc`` (its limits: ``svc.server_limits``); ``allow_origins`` and ``bind_host``
    (the ``--host`` it serves, a name the Host header may use): serve/guard.py (``*`` needs an API key)."""
    lim, slim = svc.limits, svc.server_limits
    pool = WorkerPool(slim.tokenize_threads, slim.max_tokenizing)  # tokenizing: off the event loop
    feedback_rate = RateLimiter(slim.feedback_per_minute, slim.feedback_burst)

    @asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()
        svc.close()

    app = FastAPI(title="chatfactory", description=API_DESCRIPTION, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def _crash(request, e):  # a bug must still answer in the shape clients parse, without its insides
        ref = uuid.uuid4().hex[:12]
        log.error("internal error (reference %s) on %s %s", ref, request.method, request.url.path, exc_info=e)
        return JSONResponse(APIError(500, f"internal error (reference {ref}; the server's log has the "
                                          "details)").body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):  # unknown paths and methods: OpenAI-shaped too
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    @app.middleware("http")
    async def _auth(request, call_next):
        path = request.url.path
        # the page itself and liveness stay open; the API (and the tokenizer endpoints) need the key
        if svc.api_key and not (path in ("/", "/health") or path.startswith("/static/")):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {svc.api_key}".encode()):
                msg = "Missing API key: send 'Authorization: Bearer KEY'." if not got else "Incorrect API key."
                return JSONResponse(APIError(401, msg, code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    async def read_json(request) -> dict:
        """The body as a JSON object, read under the size limit; a model other than this one is a 404."""
        # 413 as soon as a streamed body passes the limit; 408 when it takes longer than body_timeout
        raw = await read_body(request, lim.max_body_bytes, slim.body_timeout)
        try:
            body = await pool.run(json.loads, raw)  # (a large body's parse, off the event loop too)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the JSON body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object", code="invalid_json")
        model = body.get("model")
        if model is not None and model != svc.name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {svc.name!r}.", "model",
                           "model_not_found")
        return body

    def fits(what: str, texts, param: str) -> None:
        """400 before tokenizing a prompt that cannot fit the context whatever its tokens (svc.max_prompt_chars)."""
        chars = sum(len(t) for t in texts)
        if chars > svc.max_prompt_chars:
            raise APIError(400, f"This model's maximum context length is {svc.block_size} tokens; {what} has {chars} "
                                f"characters, more than {svc.max_prompt_chars} (no {svc.block_size} tokens spell "
                                "that many)", param, "context_length_exceeded")

    async def render_chat(msgs: list[dict], generation_prompt: bool = True) -> list[int]:
        try:
            if generation_prompt:
                return await pool.run(svc.tok.chat_prompt, msgs)
            return (await pool.run(svc.tok.render_chat, msgs))[0]
        except ValueError as e:  # the chat template refused the conversation, or went past its limits
            raise APIError(400, str(e), "messages", "invalid_value") from None

    def budget(req, prompts: int, n: int, max_tokens: int, scored: int = 0) -> int:
        explicit = req.max_tokens is not None or req.max_completion_tokens is not None
        sched = svc.scheduler  # (a stand-in scheduler may not say: the defaults)
        return request_budget(slim, getattr(sched, "slots", 16), getattr(sched, "context", svc.block_size), prompts,
                              n, max_tokens, explicit, scored)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream_response(gen):
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes ----
    def post(path: str, summary: str, body: str, answer, stream_chunk=None):
        """A POST route documented with its JSON body (a schema named in openapi.py), its answer and its
        errors; a generating route (one that streams ``stream_chunk`` events) may also answer 500."""
        errors = POST_ERRORS + ((500,) if stream_chunk is not None else ())
        return app.post(path, summary=summary, responses=doc(answer, *errors, stream=stream_chunk),
                        openapi_extra=body_doc(body))

    def messages(conv) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in conv]

    @app.get("/health", summary="liveness, and how busy the scheduler is", responses=doc(Health, 403))
    async def health():
        sch = svc.scheduler
        return {"status": "ok", "model": svc.name, "active": sch.active(), "waiting": len(sch.waiting),
                "slots": sch.slots, "cached_tokens": sum(sch.cache.lengths)}

    @app.get("/v1/models", summary="the one model this server serves", responses=doc(ModelList, 401, 403))
    async def models():
        return {"object": "list", "data": [{"id": svc.name, "object": "model", "created": svc.created,
                                             "owned_by": "chatfactory", "max_model_len": svc.block_size,
                                             "precision": svc.precision, **svc.memory}]}

    def chat_logprobs(entries, top: int):
        """(id, log-prob, alternatives) per token -> the chat format's list. A token that is part of a
        character is named ``bytes:\\x..`` (``Tokenizer.token_text``); ``bytes`` holds its exact bytes."""
        def one(i, v):
            return {"token": svc.tok.token_text(i), "logprob": v, "bytes": list(svc.tok.token_bytes[i])}

        # the chat format lists content tokens only
        return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in (alts or [])[:top]]}
                            for t, lp, alts in entries if t not in svc.stop_ids]}

    @post("/v1/chat/completions", "a chat completion (stream: true for server-sent events)", "ChatCompletionRequest",
          ChatCompletion, ChatCompletionChunk)
    async def chat_completions(request: HTTPRequest):
        req = await pool.run(parse_body, ChatCompletionRequest, await read_json(request))
        s = req.sampling()
        want_lp, top_lp = bool(req.logprobs), req.top_logprobs or 0
        include_usage = bool(req.stream_options is not None and req.stream_options.include_usage)
        fits("the conversation", (m.text for m in req.messages), "messages")
        prompt = await render_chat(messages(req.messages))
        max_tokens = budget(req, 1, s["n"], req.max_tokens_for(len(prompt), svc.block_size, None))
        choices, _, queue = start(svc, [prompt], s, max_tokens, top_lp if want_lp else None, client=client_of(request))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": svc.name}

        if not s["stream"]:
            async for _ in events(choices, queue, request):
                pass
            if any(c.finish is None for c in choices):
                return JSONResponse({}, status_code=499)  # the client went away; nobody reads this
            return {"id": rid, "object": "chat.completion", "created": created, "model": svc.name,
                    "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.detok.text},
                                 "logprobs": chat_logprobs(c.logprobs, top_lp) if want_lp else None,
                                 "finish_reason": finish_reason(c)} for c in choices],
                    "usage": usage([prompt], choices)}

        async def gen():
            for c in choices:
                yield sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            pending: dict[int, str] = {}  # text not sent yet, per answer
            lp_sent: dict[int, int] = {}  # log-prob entries sent, per answer
            try:
                async for c, text, _st in events(choices, queue, request):
                    if want_lp:
                        # a chunk per token that shows text, with the log-probs of every token since the
                        # last one: a token holding half a character shows none yet, and its entry rides
                        # with the token that completes the character (at the end, with what is left)
                        new = c.logprobs[lp_sent.get(c.index, 0):]
                        if text or (c.finish and any(t not in svc.stop_ids for t, _, _ in new)):
                            lp_sent[c.index] = len(c.logprobs)
                            yield sse({**head, "choices": [{"index": c.index, "delta": {"content": text},
                                                            "logprobs": chat_logprobs(new, top_lp),
                                                            "finish_reason": None}]})
                    else:
                        # tokens that arrived together leave as one chunk per answer: when the server
                        # falls behind, it sends fewer, bigger events instead of falling further behind
                        if text:
                            pending[c.index] = pending.get(c.index, "") + text
                        if c.finish or queue.empty():
                            for i, t in pending.items():
                                yield sse({**head, "choices": [{"index": i, "delta": {"content": t}, "logprobs": None,
                                                                "finish_reason": None}]})
                            pending.clear()
                    if c.finish:
                        yield sse({**head, "choices": [{"index": c.index, "delta": {}, "logprobs": None,
                                                        "finish_reason": finish_reason(c)}]})
            except APIError as e:
                yield sse(e.body())
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage([prompt], choices)})
            yield "data: [DONE]\n\n"

        return stream_response(gen())

    def completion_prompts(prompts: list[str | list[int]]) -> list[tuple[list[int], int]]:
        """-> (ids fed to the model, how many of them are a conditioning <|bos|> not shown to the client)."""
        out = []
        for i, x in enumerate(prompts):
            if isinstance(x, str):
                ids = svc.tok.encode(x)
            else:
                ids = list(x)
                # the tokenizer's vocabulary, not the model's: a padded id (an imported model's) has no
                # text to echo and no column in the scored log-probs
                bad = [t for t in ids if not 0 <= t < svc.tok.vocab_size]
                if bad:
                    raise APIError(400, f"prompt[{i}]: token id {bad[0]} is outside the vocabulary "
                                        f"(0..{svc.tok.vocab_size - 1})", "prompt", "invalid_value")
            # documents begin with bos in pretraining (when the tokenizer opens them so): condition on it,
            # but do not echo it; an empty prompt gets it in any case, as there is nothing else to read
            if (svc.tok.add_bos or not ids) and (not ids or ids[0] != svc.tok.bos_id):
                out.append(([svc.tok.bos_id] + ids, 1))
            else:
                out.append((ids, 0))
        return out

    def legacy_logprobs(ids: list[int], lps: list[float | None], tops: list, start_offset: int) -> dict:
        tokens, offsets, top_out = [], [], []
        # a token's offset counts the characters before it; one that completes a character split across
        # tokens counts it (TextStream), so offsets index the text the client got
        text, off = TextStream(svc.tok), start_offset
        for t, alts in zip(ids, tops):
            tokens.append(svc.tok.token_text(t))
            offsets.append(off)
            off += len(text.add(t))
            top_out.append(None if alts is None else {svc.tok.token_text(i): v for i, v in alts})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top_out, "text_offset": offsets}

    @post("/v1/completions", "a text completion; with echo and logprobs it scores the prompt", "CompletionRequest",
          Completion, CompletionChunk)
    async def completions(request: HTTPRequest):
        req = await pool.run(parse_body, CompletionRequest, await read_json(request))
        s = req.sampling()
        echo, logprobs = bool(req.echo), req.logprobs
        for i, p in enumerate(req.prompts()):
            if isinstance(p, str):
                fits(f"prompt[{i}]", [p], "prompt")
        prompts = await pool.run(completion_prompts, req.prompts())
        longest = max(len(ids) for ids, _ in prompts)
        max_tokens = req.max_tokens_for(longest, svc.block_size, 16)
        if s["stream"] and (echo or logprobs is not None):
            raise APIError(400, "'echo' and 'logprobs' are supported without 'stream' only", "stream", "invalid_value")
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        feed = [ids for ids, _ in prompts]
        scoring = echo and logprobs is not None  # prompt log-probs: one forward per prompt, in the scheduler
        max_tokens = budget(req, len(feed), s["n"], max_tokens, len(feed) if scoring else 0)
        scorings: list[Scoring] = []
        queue = None
        if max_tokens > 0 or scoring:
            choices, scorings, queue = start(svc, feed if max_tokens > 0 else [], s, max_tokens, logprobs,
                                             feed if scoring else [], client_of(request))
        if max_tokens == 0:
            choices = [Choice(i * s["n"] + j, svc.tok, [], svc.stop_ids)
                       for i in range(len(feed)) for j in range(s["n"])]
            for c in choices:
                c.finish = "length"

        if s["stream"]:
            head = {"id": rid, "object": "text_completion", "created": created, "model": svc.name}

            async def gen():
                try:
                    if queue is not None:
                        pending: dict[int, str] = {}
                        async for c, text, _st in events(choices, queue, request):
                            pending[c.index] = pending.get(c.index, "") + text
                            if c.finish or queue.empty():  # coalesce what arrived together, as in chat
                                for i, t in pending.items():
                                    done = choices[i].finish  # choices[i].index == i
                                    if t or done:
                                        why = finish_reason(choices[i]) if done else None
                                        yield sse({**head, "choices": [{"index": i, "text": t, "logprobs": None,
                                                                        "finish_reason": why}]})
                                pending.clear()
                except APIError as e:
                    yield sse(e.body())
                yield "data: [DONE]\n\n"

            return stream_response(gen())

        if queue is not None:
            parts = [c for c in choices if c.finish is None] + scorings
            async for _ in events(parts, queue, request):
                pass
            if any(c.finish is None for c in parts):
                return JSONResponse({}, status_code=499)
        scored = {sc.index: sc.result for sc in scorings}

        def answer() -> JSONResponse:  # every token decoded and serialized: off the event loop too
            out = []
            for c in choices:
                pi = c.index // s["n"]
                ids, skip = prompts[pi]
                shown = ids[skip:]
                prompt_text = svc.tok.decode(shown) if echo else ""
                text = prompt_text + c.detok.text
                lp = None
                if logprobs is not None:
                    gen_ids = [t for t, _, _ in c.logprobs]
                    gen_lps = [v for _, v, _ in c.logprobs]
                    gen_tops = [a or [] for _, _, a in c.logprobs]
                    if echo:
                        # scored[k] is the log-prob of ids[k+1]; the first shown token gets null (OpenAI's
                        # format), even when a hidden <|bos|> before it makes it computable
                        plps, ptops = scored[pi]
                        p_l = [None] + (plps[1:] if skip else plps)
                        p_t = [None] + (ptops[1:] if skip else ptops)
                        lp = legacy_logprobs(shown + gen_ids, p_l + gen_lps, p_t + gen_tops, 0)
                    else:
                        lp = legacy_logprobs(gen_ids, gen_lps, gen_tops, len(prompt_text))
                out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish_reason(c)})
            return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": svc.name,
                                 "choices": out, "usage": usage(feed, choices)})

        return await pool.run(answer, admitted=True)

    # ---- tokenizer endpoints, as vLLM serves them: lm-eval's local-completions finds them by itself
    # and then needs no tokenizer files of its own ("remote" tokenizer backend). Text is tokenized as
    # the Hugging Face export does: spelled-out special tokens are special here.
    @app.get("/tokenizer_info", summary="the tokenizer and its chat template (vLLM's endpoint)",
             responses=doc(TokenizerInfo, 401, 403))
    async def tokenizer_info():
        return {"tokenizer_class": "chatfactory", **svc.tok.chat_config,
                "model_max_length": svc.block_size, "vocab_size": svc.tok.vocab_size}

    @post("/tokenize", "text, or a conversation rendered by the chat template, to token ids", "TokenizeRequest",
          TokenizeResponse)
    async def tokenize(request: HTTPRequest):
        req = await pool.run(parse_tokenize, await read_json(request))
        if isinstance(req, TokenizeChat):
            ids = await render_chat(messages(req.messages), req.add_generation_prompt is not False)
        else:
            ids = (await pool.run(lambda p: svc.tok.hf.encode(p, add_special_tokens=False), req.prompt)).ids
            if req.add_special_tokens is not False and svc.tok.add_bos:
                ids = [svc.tok.bos_id] + ids
        return {"tokens": ids, "count": len(ids), "max_model_len": svc.block_size}

    @post("/detokenize", "token ids to text", "DetokenizeRequest", DetokenizeResponse)
    async def detokenize(request: HTTPRequest):
        ids = (await pool.run(parse_body, DetokenizeRequest, await read_json(request))).tokens

        def decode():  # up to a megabyte of ids: off the event loop
            if any(not 0 <= t < svc.tok.vocab_size for t in ids):
                raise APIError(400, "'tokens' holds an id outside the vocabulary", "tokens", "invalid_value")
            return {"prompt": svc.tok.decode(ids)}
        return await pool.run(decode)

    @post("/v1/feedback", "a thumbs up/down rating, or a preference between two answers (SQLite)", "FeedbackRequest",
          FeedbackCreated)
    async def feedback(request: HTTPRequest):
        body = await read_json(request)
        if svc.feedback is None:
            raise APIError(404, "this server keeps no feedback store", code="feedback_disabled")
        req = parse_feedback(body)
        item = req.model_dump(exclude={"model", "rater"}, exclude_none=True)
        wait = feedback_rate.take(client_of(request))
        if wait:
            raise APIError(429, f"too much feedback from this client: at most {slim.feedback_per_minute:g} a minute "
                                f"(bursts of {slim.feedback_burst}); retry later", code="rate_limited",
                           retry_after=wait)
        try:
            fid = await asyncio.to_thread(svc.feedback.add, item, svc.name, svc.stage, rater_of(request, req.rater))
        except FeedbackFull as e:
            raise APIError(400, str(e), "messages", "feedback_limit") from None
        except FeedbackStoreError:
            raise  # the server's file, not the request: a 500 (the log names the file)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        answer = JSONResponse({"id": fid, "object": "feedback"})
        set_rater_cookie(answer, request)  # a client without one is known by its address until it sends it
        return answer

    def rater_of(request: HTTPRequest, named: str | None) -> str:
        """Who votes, as feedback.py's rater id. A caller with the API key names its raters (``X-Rater``, else
        the body's ``rater``, else its cookie: several people may share a key); anyone else cannot choose: the
        ``cf_rater`` cookie, else the address (a script that drops cookies stays one rater)."""
        cookie = request.cookies.get(RATER_COOKIE, "")
        cookie = cookie if RATER_TOKEN.fullmatch(cookie) else ""
        if svc.api_key:
            name = request.headers.get("x-rater") or named or cookie
            if len(name) > 200:
                raise APIError(400, "X-Rater: at most 200 characters", "X-Rater", "invalid_value")
            return svc.feedback.rater_id("key", svc.api_key, name)
        if cookie:
            return svc.feedback.rater_id("cookie", cookie)
        return svc.feedback.rater_id("address", client_of(request))

    # ---- the web UI: one static page; the CSP forbids inline script as a second line of defence ----
    csp = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

    @app.get("/", summary="the web chat", response_class=Response, responses=file_doc("index.html"))
    async def index(request: HTTPRequest):
        page = FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": csp})
        set_rater_cookie(page, request)  # the rater id of the votes cast from this page
        return page

    @app.get("/static/{name}", summary="the web chat's script and style", response_class=Response,
             responses=file_doc(*(p.name for p in STATIC.iterdir()), missing=True))
    async def static(name: str):
        path = STATIC / name
        if name not in {p.name for p in STATIC.iterdir()} or not path.is_file():
            raise APIError(404, f"no static file {name!r}")
        return FileResponse(path, headers={"Content-Security-Policy": csp})

    # outermost: foreign pages and non-JSON writes are refused first
    install_guards(app, allow_origins, bind_host, svc.api_key)

    def openapi():
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, svc)
        return app.openapi_schema

    app.openapi = openapi
    return app
