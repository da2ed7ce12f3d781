"""What every group of routes shares, handed from ``api.create_app`` to the modules that add routes of their
own (votes.py, arena.py, admin.py): the app, the service, the worker pool, and the helpers that read and
check a request the same way for every route."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class RouteKit:
    app: object  # the FastAPI app
    svc: object  # service.Service
    pool: object  # limits.WorkerPool: tokenizing and parsing off the event loop
    feedback_rate: object  # limits.RateLimiter of votes per client (feedback, arena votes)
    read_json: Callable  # async (request) -> the body as a dict, under the size limit
    post: Callable  # (path, summary, body schema name, answer model[, stream chunk]) -> a route decorator
    render_chat: Callable  # async (messages) -> prompt ids (400 naming messages when the template refuses)
    fits: Callable  # (what, texts, param, served) -> None, or 400 for a prompt too long for any tokenization
    budget: Callable  # (req, prompts, n, max_tokens, served) -> the max_tokens to use
    sse: Callable  # (obj) -> one server-sent event
    stream_response: Callable  # (async generator, lease(s) to release after) -> StreamingResponse
    messages: Callable  # (request messages) -> [{"role", "content"}]
