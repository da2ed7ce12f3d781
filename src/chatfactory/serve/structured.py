"""Structured outputs: what a chat request's ``response_format`` asks of the reply, as a grammar every one of
its ``n`` answers is decoded under (inference/grammar.py), or a 400 naming the part of the request the
grammar library refused."""

from __future__ import annotations

from collections.abc import Callable

from ..inference.grammar import Constraint, GrammarError, Grammars
from .protocol import APIError, ChatCompletionRequest


def response_constraint(grammars: Grammars, req: ChatCompletionRequest) -> Callable[[], Constraint] | None:
    """-> a function giving each answer its own constraint (None: the reply is free text). Compiles once
    here, so a bad schema is refused before anything is queued; each answer gets a fork of it."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if req.ignore_eos:
        raise APIError(400, "ignore_eos: a reply under response_format ends when its JSON does; ignore_eos "
                            "cannot be true with it", "ignore_eos", "invalid_value")
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
    try:
        first = grammars.json_schema(schema)
    except GrammarError as e:
        param = "response_format.json_schema.schema" if fmt.type == "json_schema" else "response_format"
        raise APIError(400, f"{param}: the grammar library refuses this schema: {e}", param, "invalid_value") from None
    return first.fork
