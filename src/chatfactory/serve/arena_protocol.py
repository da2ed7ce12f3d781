"""The arena's and the admin routes' request bodies and answers (as protocol.py and responses.py are for the
OpenAI routes): the pydantic models that validate the bodies, and from which /openapi.json describes them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, Strict

from .protocol import Body, Conversation, Int, SamplingBody, int_choice

Version = Int(ge=1, description="a version of the run (RUN/versions/N)")
BattleId = Annotated[str, Strict(), Field(min_length=1, max_length=100)]


class ArenaBattleRequest(SamplingBody):
    """One prompt for two versions: the arena's pair (the served version and its candidate, or the two an
    admin named). ``n`` is 1 (each version answers once); ``model`` is ignored: the server picks the versions,
    and which one is answer 0 is drawn at random."""
    messages: Conversation
    max_tokens: Int(ge=1) | None = Field(None, description="default: the room left in the context")
    max_completion_tokens: Int(ge=1) | None = Field(None, description="OpenAI's newer name for max_tokens")


class ArenaVoteRequest(BaseModel):
    """The vote on a battle: ``a`` (answers[0] is better), ``b``, ``tie`` or ``both_bad``. The server knows
    which version wrote each answer; a vote that names versions (``models``) or answers is refused."""
    battle_id: BattleId
    choice: Literal["a", "b", "tie", "both_bad"]
    shown_left: int_choice(0, 1) | None = Field(None, description="which answer the page showed on the left")
    reason: Annotated[str, Strict(), Field(max_length=500)] | None = Field(None, description="why (optional)")
    rater: Annotated[str, Strict(), Field(min_length=1, max_length=200)] | None = Field(
        None, description="honoured only from a caller with the API key, as for /v1/feedback")


class ArenaSetup(Body):
    """``{"candidate": N}``: the served version against version N (before it is promoted, say);
    ``{"versions": [N, M]}``: any two versions; ``{"candidate": null}`` (or ``{}``): close the arena."""
    candidate: Version | None = None
    versions: Annotated[list[Version], Field(min_length=2, max_length=2)] | None = None


class AdminEmpty(Body):
    """No fields (an empty body, or ``{}``)."""


class RollbackRequest(Body):
    to: Version | None = Field(None, description="the version to serve (default: the one served before)")


# ---------------------------------------------------------------- answers (for the schema)
class ArenaBattle(BaseModel):
    id: str = Field(description="the battle_id to vote with")
    object: Literal["arena.battle"]
    answers: list[str] = Field(description="answer 0 and answer 1; their versions are revealed by the vote")
    finish_reasons: list[str]


class ArenaBattleChunk(BaseModel):
    """With stream: true, events of ``{"index", "delta"}`` text, then the battle itself (no answers)."""
    index: int | None = None
    delta: str | None = None
    id: str | None = None
    object: Literal["arena.battle.chunk", "arena.battle"]
    finish_reasons: list[str] | None = None


class ArenaVote(BaseModel):
    id: int = Field(description="the feedback row")
    object: Literal["arena.vote"]
    battle_id: str
    choice: str
    models: list[str] = Field(description="the versions that wrote answer 0 and answer 1, revealed")


class BoardRow(BaseModel):
    model: str
    score: float = Field(description="Bradley–Terry score, Elo-like scale (400 points: 10:1 odds)")
    lo: float
    hi: float
    elo: float
    battles: int
    wins: int
    ties: int = Field(description="ties and both-bad votes")
    losses: int
    rank: int


class BoardGap(BaseModel):
    better: str
    worse: str
    lo: float = Field(description="the bootstrap interval of the score difference, taken per round")
    hi: float
    separated: bool = Field(description="the interval excludes 0")


class LeaderboardAnswer(BaseModel):
    object: Literal["leaderboard"]
    battles: int
    level: float
    rounds: int
    data: list[BoardRow]
    gaps: list[BoardGap] = Field(description="each model against the next one down the board")


class ArenaState(BaseModel):
    object: Literal["arena"]
    open: bool
    models: list[str]
    versions: list[int | None] | None = None


class ReloadAnswer(BaseModel):
    object: Literal["reload"]
    changed: bool
    version: int | None
    model: str
    previous: str | None
