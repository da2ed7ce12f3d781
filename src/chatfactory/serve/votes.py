"""People's votes over HTTP: ``POST /v1/feedback`` (thumbs and comparisons, serve/feedback.py's rows) and who
votes (``rater_of``: the rater id every vote carries, the arena's too)."""

from __future__ import annotations

import asyncio
import re
import secrets

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response

from .feedback import FeedbackFull, FeedbackStoreError
from .feedback_protocol import parse_feedback
from .limits import client_of
from .protocol import APIError
from .responses import FeedbackCreated

RATER_COOKIE = "cf_rater"  # an opaque random id: who votes from this browser (feedback.py hashes it)
RATER_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}")  # what the server sets; anything else is no cookie


def set_rater_cookie(response: Response, request: HTTPRequest) -> None:
    """Give a browser without one its ``cf_rater``: random, unreadable by script, never sent by another site."""
    if not RATER_TOKEN.fullmatch(request.cookies.get(RATER_COOKIE, "")):
        response.set_cookie(RATER_COOKIE, secrets.token_urlsafe(18), max_age=365 * 86400, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")


def rater_of(svc, request: HTTPRequest, named: str | None) -> str:
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


def take_vote_token(kit, request: HTTPRequest) -> None:
    """429 when this client sends votes faster than the server takes them (one bucket for every kind)."""
    slim = kit.svc.server_limits
    wait = kit.feedback_rate.take(client_of(request))
    if wait:
        raise APIError(429, f"too much feedback from this client: at most {slim.feedback_per_minute:g} a minute "
                            f"(bursts of {slim.feedback_burst}); retry later", code="rate_limited", retry_after=wait)


async def store_vote(svc, item: dict, model, stage, rater: str, battle: str | None = None) -> int:
    """One vote into the store (in a thread: SQLite waits for its lock) -> its id; a bad vote is a 400."""
    try:
        return await asyncio.to_thread(svc.feedback.add, item, model, stage, rater, battle)
    except FeedbackFull as e:
        raise APIError(400, str(e), "messages", "feedback_limit") from None
    except FeedbackStoreError:
        raise  # the server's file, not the request: a 500 (the log names the file)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def need_store(svc) -> None:
    if svc.feedback is None:
        raise APIError(404, "this server keeps no feedback store", code="feedback_disabled")


def install_votes(kit) -> None:
    svc = kit.svc

    @kit.post("/v1/feedback", "a thumbs up/down rating, or a preference between two answers (SQLite)",
              "FeedbackRequest", FeedbackCreated)
    async def feedback(request: HTTPRequest):
        body = await kit.read_json(request)
        need_store(svc)
        req = parse_feedback(body)
        # the version the vote is about: the one the body names (read_json checked that this server answers
        # to it: an answer written before a swap keeps its version), else the one served now
        model = req.model if req.model is not None else svc.name
        stage = svc.stage if model == svc.name else None
        item = req.model_dump(exclude={"model", "rater"}, exclude_none=True)
        take_vote_token(kit, request)
        fid = await store_vote(svc, item, model, stage, rater_of(svc, request, req.rater))
        answer = JSONResponse({"id": fid, "object": "feedback"})
        set_rater_cookie(answer, request)  # a client without one is known by its address until it sends it
        return answer
