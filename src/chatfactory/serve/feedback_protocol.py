"""``POST /v1/feedback``'s request bodies: a rating of one answer or a comparison of two (votes.py routes
them), checked as protocol.py checks every body."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, Strict

from ..text.tokenizer import ROLES
from .protocol import LIMITS, APIError, Body, Text, _system_first, int_choice, parse_body


class FeedbackTurn(BaseModel):
    role: Literal[ROLES]
    content: Text


class LaterFeedbackTurn(FeedbackTurn):
    role: Literal["user", "assistant"]


FeedbackConversation = Annotated[list[FeedbackTurn], Field(min_length=1, max_length=LIMITS.max_messages),
                                 AfterValidator(_system_first)]


Name = Annotated[str, Strict(), Field(min_length=1, max_length=200)]
Reason = Annotated[str, Strict(), Field(max_length=500)]
RATER_DOC = ("honoured only from a caller with the API key, as the X-Rater header is (the header wins): who rated, "
             "kept as a salted hash; anyone else is known by the cf_rater cookie the server sets, or their address")


class RatingFeedback(Body):
    """Thumbs up (1) or down (-1) on one answer to ``messages``, and why (optional)."""
    kind: Literal["rating"]
    messages: FeedbackConversation = Field(description="the conversation the answer replies to (it ends before it)")
    answer: Text
    rating: int_choice(1, -1)
    reason: Reason | None = Field(None, description="why (optional)")
    rater: Name | None = Field(None, description=RATER_DOC)


class ComparisonFeedback(Body):
    """Two answers to ``messages`` side by side and the better one: ``choice`` (``a`` = answers[0], ``b`` =
    answers[1], ``tie``, ``both_bad``) or, as older clients send it, ``preferred`` (0 or 1, the index of the better
    answer); exactly one of the two."""
    kind: Literal["comparison"]
    messages: FeedbackConversation = Field(description="the conversation the answers reply to (it ends before them)")
    answers: Annotated[list[Text], Field(min_length=2, max_length=2)]
    choice: Literal["a", "b", "tie", "both_bad"] | None = Field(None, description="a, b, tie or both_bad")
    preferred: int_choice(0, 1) | None = Field(None, description="0 or 1: the index of the better answer (older "
                                                                  "clients; give choice or preferred)")
    shown_left: int_choice(0, 1) | None = Field(None, description="which answer the page showed on the left (0 or "
                                                                   "1); it draws the side at random")
    models: Annotated[list[Name], Field(min_length=2, max_length=2)] | None = Field(
        None, description="the model version that wrote each answer (default: this server's model)")
    reason: Reason | None = Field(None, description="why (optional)")
    rater: Name | None = Field(None, description=RATER_DOC)


# told apart by ``kind``, as parse_feedback reads it
FeedbackRequest = Annotated[RatingFeedback | ComparisonFeedback, Field(discriminator="kind")]


def parse_feedback(body: dict) -> RatingFeedback | ComparisonFeedback:
    kind = body.get("kind")
    model = {"rating": RatingFeedback, "comparison": ComparisonFeedback}.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise APIError(400, f"kind: expected 'rating' or 'comparison', got {kind!r}", "kind",
                       "missing" if kind is None else "invalid_value")
    req = parse_body(model, body)
    if isinstance(req, ComparisonFeedback) and (req.choice is None) == (req.preferred is None):
        raise APIError(400, "choice: give exactly one of 'choice' ('a', 'b', 'tie' or 'both_bad') and 'preferred' "
                            "(0 or 1)", "choice", "missing" if req.choice is None else "invalid_value")
    return req
