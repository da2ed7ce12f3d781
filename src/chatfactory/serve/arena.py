"""The arena: two versions answer one prompt side by side, anonymously; people vote; a leaderboard ranks them.

    POST /v1/arena/battle {"messages": [...], "max_tokens"?, "temperature"?, "stream"?}
         -> {"id": "battle-…", "object": "arena.battle", "answers": [a0, a1], "finish_reasons": [...]}
    POST /v1/arena/vote   {"battle_id", "choice": "a" | "b" | "tie" | "both_bad", "shown_left"?, "reason"?}
         -> {"id": feedback id, "object": "arena.vote", "battle_id", "choice", "models": [v0, v1]}
    GET  /v1/leaderboard  -> {"object": "leaderboard", "battles": N, "data": [rows], "gaps": [...], ...}

The two versions are the arena's pair (``POST /v1/admin/arena``, serve/admin.py): the served version and a
candidate, or two versions an admin named. Which of them writes answer 0 is drawn at random per battle, and
the battle answers carry no version: the names come back only with the vote. The versions of a battle stay
on the server (``BattleBook``, in memory: at most ``BattleBook.cap`` open battles, each for ``ttl`` seconds;
a restart forgets battles nobody voted on), so a vote names the battle and its choice, and nothing a client
says can change which version gets the credit (a vote naming ``models`` or ``answers`` is refused). Each
battle takes one vote. The vote is a comparison row in the feedback store (``models`` = the two versions,
recorded in its ``battles`` table), so it also trains the next round like any other comparison.

The leaderboard is eval/leaderboard.py's board (Bradley–Terry with bootstrap intervals, Elo beside it) over
every decided battle (a tie and both-bad count as ties), recomputed when a vote has come in since.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import threading
import time

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse

from ..eval.leaderboard import difference_interval, leaderboard
from .arena_protocol import ArenaBattle, ArenaBattleChunk, ArenaVote, LeaderboardAnswer
from .generation import events, finish_reason, start
from .limits import client_of
from .openapi import doc
from .protocol import APIError, parse_body
from .votes import need_store, rater_of, set_rater_cookie, store_vote, take_vote_token

ROUNDS = 200  # bootstrap rounds of the leaderboard's intervals
LEVEL = 0.95


class BattleBook:
    """Battles waiting for their vote: id -> {messages, answers, models}; at most ``cap`` of them holding at
    most ``max_chars`` characters of text together (the oldest go first: a client that opens battles and never
    votes cannot fill the memory), each for ``ttl`` seconds, one vote each (``take`` removes it). Safe from
    any thread."""

    def __init__(self, cap: int = 10_000, ttl: float = 3600.0, max_chars: int = 50_000_000):
        self.cap, self.ttl, self.max_chars = cap, ttl, max_chars
        self._open: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def add(self, messages: list[dict], answers: list[str], models: list[str]) -> str:
        bid = "battle-" + secrets.token_urlsafe(16)  # unguessable: only who asked for the battle can vote on it
        chars = sum(len(m["content"]) for m in messages) + sum(map(len, answers))
        self.put_back(bid, {"messages": messages, "answers": answers, "models": models, "at": time.monotonic(),
                            "chars": chars})
        return bid

    def put_back(self, bid: str, battle: dict) -> None:
        """Open ``battle`` (again, when its vote could not be stored: the vote can be sent again)."""
        with self._lock:
            self._open[bid] = battle
            self._chars += battle["chars"]
            while len(self._open) > self.cap or (self._chars > self.max_chars and len(self._open) > 1):
                self._chars -= self._open.popitem(last=False)[1]["chars"]

    def take(self, bid: str) -> dict | None:
        with self._lock:
            battle = self._open.pop(bid, None)
            self._chars -= battle["chars"] if battle is not None else 0
        if battle is None or time.monotonic() - battle["at"] > self.ttl:
            return None
        return battle


class Board:
    """The leaderboard over the store's battles, computed again only when a vote has come in since."""

    def __init__(self, store):
        self.store, self._key, self._answer = store, None, None
        self._lock = threading.Lock()

    def get(self) -> dict:
        with self._lock:  # (one computation at a time; others wait for it and take its answer)
            battles = self.store.battles()
            key = (len(battles), battles[-1]["id"] if battles else 0)
            if key != self._key:
                self._answer, self._key = board_answer(battles), key
            return self._answer


def board_answer(battles: list[dict]) -> dict:
    """GET /v1/leaderboard's answer for these battles (see LeaderboardAnswer)."""
    out = {"object": "leaderboard", "battles": len(battles), "level": LEVEL, "rounds": ROUNDS, "data": [], "gaps": []}
    if not battles:
        return out
    board = leaderboard(battles, rounds=ROUNDS, seed=0, level=LEVEL)
    out["data"] = list(board)
    for hi, lo in zip(board, board[1:]):
        d_lo, d_hi = difference_interval(board, hi["model"], lo["model"])
        out["gaps"].append({"better": hi["model"], "worse": lo["model"], "lo": d_lo, "hi": d_hi,
                            "separated": d_lo > 0 or d_hi < 0})
    return out


def install_arena(kit) -> None:
    from .arena_protocol import ArenaBattleRequest, ArenaVoteRequest

    svc, app = kit.svc, kit.app
    book = BattleBook()
    board = Board(svc.feedback) if svc.feedback is not None else None

    @kit.post("/v1/arena/battle", "two versions answer one prompt, anonymously (stream: true for events)",
              "ArenaBattleRequest", ArenaBattle, ArenaBattleChunk, errors=(409,))
    async def battle(request: HTTPRequest):
        need_store(svc)  # a battle nobody can vote on would be wasted work
        req = await kit.pool.run(parse_body, ArenaBattleRequest, await kit.read_json(request))
        s = req.sampling()
        if s["n"] != 1:
            raise APIError(400, "n: each version answers once in a battle", "n", "invalid_value")
        leases = list(svc.lease_pair())
        handed = False
        try:
            if secrets.randbelow(2):  # which version writes answer 0: drawn per battle
                leases.reverse()
            sides = [lease.served for lease in leases]
            for side in sides:
                kit.fits("the conversation", (m.text for m in req.messages), "messages", side)
            msgs = kit.messages(req.messages)
            prompt = await kit.render_chat(msgs)
            block = min(side.block_size for side in sides)
            max_tokens = min(kit.budget(req, 1, 1, req.max_tokens_for(len(prompt), block, None), side)
                             for side in sides)
            choices, _, queue = start(sides[0], [prompt], s, max_tokens, client=client_of(request))
            try:
                other, _, _ = start(sides[1], [prompt], s, max_tokens, client=client_of(request), queue=queue)
            except BaseException:
                choices[0].req.cancel()
                raise
            other[0].index = 1
            parts = choices + other

            def record() -> dict:
                bid = book.add(msgs, [c.detok.text for c in parts], [side.name for side in sides])
                return {"id": bid, "object": "arena.battle", "finish_reasons": [finish_reason(c) for c in parts]}

            if not s["stream"]:
                async for _ in events(parts, queue, request):
                    pass
                if any(c.finish is None for c in parts):
                    return JSONResponse({}, status_code=499)  # the client went away
                done = record()
                return {**done, "answers": [c.detok.text for c in parts]}

            async def gen():
                try:
                    async for c, text, _st in events(parts, queue, request):
                        if text:
                            yield kit.sse({"object": "arena.battle.chunk", "index": c.index, "delta": text})
                    if all(c.finish is not None for c in parts):
                        yield kit.sse(record())
                except APIError as e:
                    yield kit.sse(e.body())
                yield "data: [DONE]\n\n"

            handed = True
            return kit.stream_response(gen(), *leases)
        finally:
            if not handed:
                for lease in leases:
                    lease.release()

    @kit.post("/v1/arena/vote", "the vote on a battle; the answer reveals which version wrote each answer",
              "ArenaVoteRequest", ArenaVote)
    async def vote(request: HTTPRequest):
        body = await kit.read_json(request)
        need_store(svc)
        for forged in ("models", "answers", "messages"):
            if forged in body:
                raise APIError(400, f"{forged}: a vote names its battle_id only; the server keeps the battle's "
                                    "conversation, answers and versions", forged, "invalid_value")
        req = parse_body(ArenaVoteRequest, body)
        take_vote_token(kit, request)
        rater = rater_of(svc, request, req.rater)
        won = book.take(req.battle_id)
        if won is None:
            raise APIError(404, "battle_id: no open battle with this id (voted on already, expired, or from "
                                "before the server restarted); start a new one", "battle_id", "battle_not_found")
        item = {"kind": "comparison", "messages": won["messages"], "answers": won["answers"], "choice": req.choice,
                "models": won["models"], **({"shown_left": req.shown_left} if req.shown_left is not None else {}),
                **({"reason": req.reason} if req.reason is not None else {})}
        try:
            fid = await store_vote(svc, item, None, "arena", rater, battle=req.battle_id)
        except BaseException:
            book.put_back(req.battle_id, won)
            raise
        answer = JSONResponse({"id": fid, "object": "arena.vote", "battle_id": req.battle_id, "choice": req.choice,
                               "models": won["models"]})
        set_rater_cookie(answer, request)
        return answer

    @app.get("/v1/leaderboard", summary="the arena's ranking: Bradley–Terry, bootstrap intervals, Elo",
             responses=doc(LeaderboardAnswer, 401, 403, 404))
    async def leaderboard_route():
        need_store(svc)
        return await asyncio.to_thread(board.get)
