"""The server's OpenAPI schema (``GET /openapi.json``): FastAPI's description of the routes, plus the
request bodies generated from the same pydantic models that validate them (protocol.py), the answers
(responses.py), the server-sent events, and the errors each route really returns, narrowed to what one
server accepts: its model ids, its context length, its vocabulary and its static files. The fuzzing
bench (bench/fuzz_and_soak.py) generates requests from it and checks the answers against it.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

from .arena_protocol import (
    AdminEmpty,
    ArenaBattleChunk,
    ArenaBattleRequest,
    ArenaSetup,
    ArenaVoteRequest,
    RollbackRequest,
)
from .feedback_protocol import FeedbackRequest, LaterFeedbackTurn
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LaterChatMessage,
    TokenizeRequest,
)
from .responses import ChatCompletionChunk, CompletionChunk, ErrorResponse

STATIC = Path(__file__).parent / "static"

API_DESCRIPTION = ("An OpenAI-compatible API for one chatfactory model, its tokenizer endpoints (as vLLM serves "
                   "them), human feedback, and a web chat. Errors are OpenAI's error JSON.")
ERRORS = {
    400: "a bad request: error.param names the field, error.code says what is wrong",
    401: "the server runs with --api-key and the request lacks 'Authorization: Bearer KEY' (or has a wrong one)",
    403: "a foreign page: an Origin or a Host that is not this server's nor allowed with --allow-origin; an admin "
         "route on a server without --api-key (admin_disabled)",
    404: "the body names another model (code model_not_found), feedback is off (feedback_disabled), or a vote "
         "names no open battle (battle_not_found)",
    408: "the body did not arrive within the server's body deadline (code request_timeout)",
    413: "the body is over the size limit (counted while it streams in)",
    409: "the arena is not set up (arena_closed), or the server serves a pinned --stage (versions_off)",
    415: "a POST whose Content-Type is not application/json",
    429: "busy: the queue, or this client's share of it, is full (server_busy), or this client sent too much "
         "feedback (rate_limited); Retry-After says when to try again",
    500: "generation failed (code engine_error); the message names a reference in the server's log, no more; "
         "an admin route's version that loaded but did not generate (version_failed)",
}
POST_ERRORS = (400, 401, 403, 404, 408, 413, 415, 429)
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
# what each request body is, by its schema's name in components/schemas
REQUEST_BODIES = {"ChatCompletionRequest": ChatCompletionRequest, "CompletionRequest": CompletionRequest,
                  "FeedbackRequest": FeedbackRequest, "TokenizeRequest": TokenizeRequest,
                  "DetokenizeRequest": DetokenizeRequest, "ArenaBattleRequest": ArenaBattleRequest,
                  "ArenaVoteRequest": ArenaVoteRequest, "ArenaSetup": ArenaSetup, "RollbackRequest": RollbackRequest,
                  "AdminEmpty": AdminEmpty,
                  # only a conversation's first message may be a system message (JSON Schema's prefixItems)
                  "LaterChatMessage": LaterChatMessage, "LaterFeedbackTurn": LaterFeedbackTurn}
LATER = {"#/components/schemas/ChatMessage": "#/components/schemas/LaterChatMessage",
         "#/components/schemas/FeedbackTurn": "#/components/schemas/LaterFeedbackTurn"}


def doc(model, *errors: int, stream=None) -> dict:
    """``responses=`` for a route answering ``model`` as JSON (with stream: true, ``stream`` chunks as
    server-sent events) and these errors."""
    ok: dict = {"model": model, "description": "OK"}
    if stream is not None:
        ok["content"] = {"text/event-stream": {"schema": sse_event(stream.__name__)}}
    return {200: ok, **{c: {"model": ErrorResponse, "description": ERRORS[c], **({"headers": RETRY_AFTER} if c == 429
                                                                              else {})} for c in errors}}


def sse_event(chunk: str) -> dict:
    """One server-sent event (OpenAPI 3.1: ``schema`` describes each event): ``data:`` a chunk as JSON, an
    error (generation failed midway) or ``[DONE]``, the last."""
    def json_of(name):
        return {"contentMediaType": "application/json", "contentSchema": {"$ref": f"#/components/schemas/{name}"}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"type": "string",
                                    "anyOf": [{"const": "[DONE]"}, json_of(chunk), json_of("ErrorResponse")]}}}


def file_doc(*names: str, missing: bool = False) -> dict:
    types = sorted({mimetypes.guess_type(n)[0] or "application/octet-stream" for n in names})
    out = {200: {"description": "the file", "content": {t: {"schema": {"type": "string"}} for t in types}},
           403: {"model": ErrorResponse, "description": ERRORS[403]}}
    if missing:
        out[404] = {"model": ErrorResponse, "description": "no such file"}
    return out


def body_doc(name: str) -> dict:
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def build_openapi(app, svc) -> dict:
    """FastAPI's schema of the routes, plus the request bodies (generated from the same pydantic models
    that validate them), narrowed to what this server accepts: its model ids, its context length, its
    vocabulary and its static files."""
    doc_ = get_openapi(title=app.title, version="0.1.0", description=app.description, routes=app.routes)
    schemas = doc_.setdefault("components", {}).setdefault("schemas", {})
    request_defs: dict = {}
    for name, t in REQUEST_BODIES.items():
        js = TypeAdapter(t).json_schema(ref_template="#/components/schemas/{model}")
        request_defs.update(js.pop("$defs", {}))
        request_defs[name] = js
    # referred to by the event streams' schemas only
    for chunk in (ChatCompletionChunk, CompletionChunk, ArenaBattleChunk):
        js = chunk.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        schemas.update(js.pop("$defs", {}))
        schemas[chunk.__name__] = js
    ids_below, room = svc.tok.vocab_size, svc.block_size - 1

    def narrow(node):
        if isinstance(node, dict):
            props = node.get("properties", {})
            msgs = props.get("messages", {})
            if msgs.get("items", {}).get("$ref") in LATER:  # a system message comes first or not at all
                first = msgs["items"]["$ref"]
                msgs["prefixItems"], msgs["items"] = [{"$ref": first}], {"$ref": LATER[first]}
            if "model" in props:  # the models served (null or absent: the served version)
                props["model"] = {"anyOf": [{"type": "string", "enum": svc.names()}, {"type": "null"}],
                                  "default": None, "description": props["model"].get("description", "")}
            for key in ("max_tokens", "max_completion_tokens"):
                if key in props:  # never more than the context holds (the prompt's share is checked per request)
                    for alt in props[key].get("anyOf", []):
                        if alt.get("type") == "integer":
                            alt["maximum"] = room
            if node.get("type") == "integer" and str(node.get("description", "")).startswith("a token id"):
                node["maximum"] = ids_below - 1
            for v in node.values():
                narrow(v)
        elif isinstance(node, list):
            for v in node:
                narrow(v)

    narrow(request_defs)
    schemas.update(request_defs)
    for path in doc_["paths"].values():  # nothing here answers FastAPI's 422: bad bodies get OpenAI's 400
        for op in path.values():
            op.get("responses", {}).pop("422", None)
            for p in op.get("parameters", []):
                if p["name"] == "name" and p["in"] == "path":  # /static/{name}
                    p["schema"]["enum"] = sorted(f.name for f in STATIC.iterdir())
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return doc_
