"""An OpenAI-compatible HTTP server for a chatfactory run, with a web chat UI and feedback.

    chatfactory serve --run runs/NAME [--stage ppo] [--host 127.0.0.1 --port 8000 --api-key KEY]

Existing clients work unchanged (the ``openai`` SDK, chat front ends, evaluation harnesses)::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.chat.completions.create(model="NAME/sft", messages=[{"role": "user", "content": "Hi"}])

The request format, its checks and the error shape live in ``protocol.py``; this module is the HTTP
side. Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (stream via SSE), ``POST /v1/completions``
(``logprobs`` and ``echo``: with ``echo=true, max_tokens=0`` it scores the prompt, as lm-eval's
``local-completions`` needs), ``GET /health``, and the web UI at ``/``; in modules of their own: the tokenizer
endpoints (tokenizing.py), ``POST /v1/feedback`` (votes.py), the arena and its leaderboard (arena.py), admin
routes (admin.py). ``GET /openapi.json`` describes every endpoint: its request body (the pydantic models in
protocol.py, which also validate it) and each answer, errors included. Bad requests get OpenAI's error
JSON with a 4xx status; with ``--api-key`` every ``/v1/`` request needs ``Authorization: Bearer KEY``. Streamed
deltas hold whole characters only (text/tokenizer.py's ``TextStream``, through protocol.Detokenizer): a Chinese
character or emoji split across tokens waits for the token that completes it, and with ``logprobs`` the
entries of the tokens it waited for ride in that chunk. Generation goes through the continuous-batching
scheduler (inference/batching.py): concurrent requests share the model's decode steps, and a client that
disconnects frees its slot.

Every generating request holds a lease on the model version it started on (service.py) until its answer
is complete, streamed ones included: a newly promoted version (hotswap.py) takes the requests that start
after the swap, and the answer's ``model`` names the version that wrote it.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.calculator import CalcRow
from ..text.chat_template import check_options
from ..text.tokenizer import TextStream
from .admin import install_admin
from .arena import install_arena
from .detokenize import Choice
from .generation import Scoring, events, finish_reason, start, usage
from .guard import install_guards, read_body
from .kit import RouteKit
from .limits import RateLimiter, WorkerPool, client_of, request_budget
from .openapi import API_DESCRIPTION, POST_ERRORS, STATIC, body_doc, build_openapi, doc, file_doc
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_body,
)
from .responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Health,
    ModelList,
)
from .service import Service
from .structured import ToolCallParser, active_tools, chat_message, render_with_tools, response_constraint, tool_deltas
from .tokenizing import install_tokenizer_routes
from .votes import install_votes, set_rater_cookie

# ---------------------------------------------------------------- the app

log = logging.getLogger("chatfactory.serve")


def create_app(svc: Service, allow_origins=(), bind_host: str | None = None):
    """The FastAPI app serving ``svc`` (its limits: ``svc.server_limits``); ``allow_origins`` and ``bind_host``
    (the ``--host`` it serves, a name the Host header may use): serve/guard.py (``*`` needs an API key)."""
    lim, slim = svc.limits, svc.server_limits
    pool = WorkerPool(slim.tokenize_threads, slim.max_tokenizing)  # tokenizing: off the event loop
    feedback_rate = RateLimiter(slim.feedback_per_minute, slim.feedback_burst)

    @asynccontextmanager
    async def lifespan(app):
        svc.start()  # the versions' watcher (hotswap.py), when the run's versions are served
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

    async def read_json(request, empty_ok: bool = False) -> dict:
        """The body as a JSON object, read under the size limit (``empty_ok``: no body is ``{}``); a model this
        server does not answer to is a 404 (the route takes its lease on the one it names: ``svc.lease``)."""
        # 413 as soon as a streamed body passes the limit; 408 when it takes longer than body_timeout
        raw = await read_body(request, lim.max_body_bytes, slim.body_timeout)
        if empty_ok and not raw.strip():
            return {}
        try:
            body = await pool.run(json.loads, raw)  # (a large body's parse, off the event loop too)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the JSON body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object", code="invalid_json")
        svc.check_name(body.get("model"))
        return body

    def fits(what: str, texts, param: str, served) -> None:
        """400 before tokenizing a prompt that cannot fit the context whatever its tokens (max_prompt_chars)."""
        chars, most, block = sum(len(t) for t in texts), served.max_prompt_chars, served.block_size
        if chars > most:
            raise APIError(400, f"This model's maximum context length is {block} tokens; {what} has {chars} "
                                f"characters, more than {most} (no {block} tokens spell that many)", param,
                           "context_length_exceeded")

    async def render_chat(msgs: list[dict], generation_prompt: bool = True, options: dict | None = None) -> list[int]:
        try:
            check_options(options)
        except ValueError as e:
            raise APIError(400, str(e), "chat_template_kwargs", "invalid_value") from None
        try:
            if generation_prompt:  # (template options passed only when given)
                return await pool.run(svc.tok.chat_prompt, msgs, *([options] if options else []))
            return (await pool.run(svc.tok.render_chat, msgs, False, *([options] if options else [])))[0]
        except ValueError as e:  # the chat template refused the conversation, or went past its limits
            raise APIError(400, str(e), "messages", "invalid_value") from None

    def budget(req, prompts: int, n: int, max_tokens: int, served, scored: int = 0) -> int:
        explicit = req.max_tokens is not None or req.max_completion_tokens is not None
        sched = served.scheduler  # (a stand-in scheduler may not say: the defaults)
        return request_budget(slim, getattr(sched, "slots", 16), getattr(sched, "context", served.block_size),
                              prompts, n, max_tokens, explicit, scored)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream_response(gen, *leases):
        """Server-sent events from ``gen``; ``leases`` are given back when it ends, or, should the client go
        before it starts (Starlette then never runs it), once the response is done."""
        async def body():
            try:
                async for event in gen:
                    yield event
            finally:
                for lease in leases:
                    lease.release()

        def release():
            for lease in leases:
                lease.release()
        return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(release),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes ----
    def post(path: str, summary: str, body: str, answer, stream_chunk=None, errors=()):
        """A POST route documented with its JSON body (a schema named in openapi.py), its answer and its
        errors; a generating route (one that streams ``stream_chunk`` events) may also answer 500."""
        errors = POST_ERRORS + tuple(errors) + ((500,) if stream_chunk is not None else ())
        return app.post(path, summary=summary, responses=doc(answer, *errors, stream=stream_chunk),
                        openapi_extra=body_doc(body))

    def messages(conv) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in conv]

    @app.get("/health", summary="liveness, and how busy the scheduler is", responses=doc(Health, 403))
    async def health():
        cur = svc.current
        sch = cur.scheduler
        pc = getattr(sch, "prefix", None)
        return {"status": "ok", "model": cur.name, "active": sch.active(), "waiting": len(sch.waiting),
                "slots": sch.slots, "cached_tokens": sum(sch.cache.lengths),
                "prefix_cache_mb": round(pc.bytes / 2**20, 3) if pc else 0.0,
                "prefix_hit_tokens": pc.hit_tokens if pc else 0}

    @app.get("/v1/models", summary="the served model version, and the arena's", responses=doc(ModelList, 401, 403))
    async def models():
        cur = svc.current
        cards = [(cur, "serving")] + [(s, "arena") for s in svc.arena.values() if s is not cur]
        return {"object": "list", "data": [{"id": s.name, "object": "model", "created": s.created,
                                             "owned_by": "chatfactory", "max_model_len": s.block_size,
                                             "precision": s.precision, **s.memory, "version": s.version,
                                             "role": role} for s, role in cards]}

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
        return await leased(chat_answer, request, ChatCompletionRequest)

    async def leased(answer, request, body_model):
        """The body as ``body_model``, and ``answer(request, req, lease)`` on the version this request starts on
        (it finishes there too); the lease is given back here, or by the stream when the answer is one."""
        req = await pool.run(parse_body, body_model, await read_json(request))
        lease = svc.lease(req.model)
        try:
            out = await answer(request, req, lease)
        except BaseException:
            lease.release()
            raise
        if not isinstance(out, StreamingResponse):
            lease.release()
        return out

    async def chat_answer(request, req, lease):
        served = lease.served
        s = req.sampling()
        want_lp, top_lp = bool(req.logprobs), req.top_logprobs or 0
        include_usage = bool(req.stream_options is not None and req.stream_options.include_usage)
        fits("the conversation", (m.text for m in req.messages), "messages", served)
        # tools: described in the system message, calls and results written in the format (structured.py)
        prompt, brief = await render_with_tools(req, messages(req.messages), served.tok.template.supports_tools,
                                                served.block_size, render_chat)
        max_tokens = budget(req, 1, s["n"], req.max_tokens_for(len(prompt), served.block_size, None), served)
        constraint = await pool.run(response_constraint, served.grammars, req, brief)  # (off the event loop)
        names = {t.function.name for t in active_tools(req)}
        # the calculator answers <calc> calls as a reply is written (a grammar-bound reply has none to answer)
        tool = (lambda: CalcRow(served.tok)) if constraint is None else None
        choices, _, queue = start(served, [prompt], s, max_tokens, top_lp if want_lp else None,
                                  client=client_of(request), constraint=constraint, tool=tool)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name}

        if not s["stream"]:
            async for _ in events(choices, queue, request):
                pass
            if any(c.finish is None for c in choices):
                return JSONResponse({}, status_code=499)  # the client went away; nobody reads this
            return {"id": rid, "object": "chat.completion", "created": created, "model": served.name,
                    "choices": [{"index": c.index, **chat_message(c.detok.text, finish_reason(c), names),
                                 "logprobs": chat_logprobs(c.logprobs, top_lp) if want_lp else None}
                                for c in choices],
                    "usage": usage([prompt], choices)}

        async def gen():
            for c in choices:
                yield sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            pending: dict[int, str] = {}  # text not sent yet, per answer
            lp_sent: dict[int, int] = {}  # log-prob entries sent, per answer
            parsers = {c.index: ToolCallParser(names) for c in choices} if names else {}
            try:
                async for c, text, _st in events(choices, queue, request):
                    if parsers:  # the reply read as content and tool-call deltas (OpenAI's delta contract)
                        parser = parsers[c.index]
                        for delta in tool_deltas(parser.feed(text) + (parser.finish() if c.finish else [])):
                            yield sse({**head, "choices": [{"index": c.index, "delta": delta, "logprobs": None,
                                                            "finish_reason": None}]})
                    elif want_lp:
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
                        why = finish_reason(c)
                        if why == "stop" and c.index in parsers and parsers[c.index].calls_done() \
                                and not parsers[c.index].broken:
                            why = "tool_calls"
                        yield sse({**head, "choices": [{"index": c.index, "delta": {}, "logprobs": None,
                                                        "finish_reason": why}]})
            except APIError as e:
                yield sse(e.body())
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage([prompt], choices)})
            yield "data: [DONE]\n\n"

        return stream_response(gen(), lease)

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
        return await leased(completion_answer, request, CompletionRequest)

    async def completion_answer(request, req, lease):
        served = lease.served
        s = req.sampling()
        echo, logprobs = bool(req.echo), req.logprobs
        for i, p in enumerate(req.prompts()):
            if isinstance(p, str):
                fits(f"prompt[{i}]", [p], "prompt", served)
        prompts = await pool.run(completion_prompts, req.prompts())
        longest = max(len(ids) for ids, _ in prompts)
        max_tokens = req.max_tokens_for(longest, served.block_size, 16)
        if s["stream"] and (echo or logprobs is not None):
            raise APIError(400, "'echo' and 'logprobs' are supported without 'stream' only", "stream", "invalid_value")
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        feed = [ids for ids, _ in prompts]
        scoring = echo and logprobs is not None  # prompt log-probs: one forward per prompt, in the scheduler
        max_tokens = budget(req, len(feed), s["n"], max_tokens, served, len(feed) if scoring else 0)
        scorings: list[Scoring] = []
        queue = None
        if max_tokens > 0 or scoring:
            choices, scorings, queue = start(served, feed if max_tokens > 0 else [], s, max_tokens, logprobs,
                                             feed if scoring else [], client_of(request))
        if max_tokens == 0:
            choices = [Choice(i * s["n"] + j, svc.tok, [], svc.stop_ids)
                       for i in range(len(feed)) for j in range(s["n"])]
            for c in choices:
                c.finish = "length"

        if s["stream"]:
            head = {"id": rid, "object": "text_completion", "created": created, "model": served.name}

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

            return stream_response(gen(), lease)

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
            return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": served.name,
                                 "choices": out, "usage": usage(feed, choices)})

        return await pool.run(answer, admitted=True)

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

    # votes, the arena and its leaderboard, admin: routes of their own modules, with the helpers above
    kit = RouteKit(app=app, svc=svc, pool=pool, feedback_rate=feedback_rate, read_json=read_json, post=post,
                   render_chat=render_chat, fits=fits, budget=budget, sse=sse, stream_response=stream_response,
                   messages=messages)
    install_tokenizer_routes(kit)
    install_votes(kit)
    install_arena(kit)
    install_admin(kit)

    # outermost: foreign pages and non-JSON writes are refused first
    install_guards(app, allow_origins, bind_host, svc.api_key)

    described_for: list = []  # the model names the cached schema lists

    def openapi():  # described again when the names it accepts change (a swap, the arena)
        names = svc.names()
        if app.openapi_schema is None or described_for != names:
            app.openapi_schema = build_openapi(app, svc)
            described_for[:] = names
        return app.openapi_schema

    app.openapi = openapi
    return app
