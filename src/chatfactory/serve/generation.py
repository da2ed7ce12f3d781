"""A request's work through the scheduler: its generations (``n`` per prompt) and the prompts it scores
(``echo`` + ``logprobs``) go in as one group, admitted whole or refused whole (429 with Retry-After, the
client's share of the queue or the queue itself full), and come back as events until every part has
finished; a client that hangs up cancels them all, scoring included (inference/batching.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid

from ..inference.batching import QueueFull, Request, Step
from ..inference.sampling import SamplingParams
from .detokenize import Choice
from .guard import client_gone
from .protocol import APIError

log = logging.getLogger("chatfactory.serve")


class Scoring:
    """The log-probs of one prompt's tokens, computed by the scheduler (``Step.scored``)."""

    def __init__(self, index: int):
        self.index, self.finish, self.req = index, None, None
        self.result: tuple[list[float], list] | None = None

    def feed(self, step: Step) -> str:
        if step.finish:
            self.finish, self.result = step.finish, step.scored
        return ""


def start(svc, prompts: list[list[int]], s: dict, max_tokens: int, logprobs=None, score: list[list[int]] = (),
          client: str = "", queue: asyncio.Queue | None = None,
          constraint=None, tool=None) -> tuple[list[Choice], list[Scoring], asyncio.Queue]:
    """Submit ``n`` samples of each of ``prompts`` (index = prompt * n + sample) and a scoring of each of
    ``score`` (index = its place there), as one group -> (choices, scorings, the queue their Steps arrive on).
    ``svc``: what serves them (service.Served: its tokenizer, stop ids and scheduler); ``queue``: one that
    another group's Steps arrive on too (the arena's two versions answer one prompt together); ``constraint``:
    a function giving each answer its own grammar (structured.py), or None; ``tool``: one giving each answer
    its own tool the scheduler runs as it is written (the calculator), or None."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue() if queue is None else queue
    choices, scorings, reqs = [], [], []

    def add(part, prompt, params, lp, scoring=False):
        req = Request(prompt, params, emit=lambda st: loop.call_soon_threadsafe(queue.put_nowait, (part, st)),
                      logprobs=lp, client=client, score=scoring,
                      constraint=constraint() if constraint is not None and not scoring else None,
                      tool=tool() if tool is not None and not scoring else None)
        part.req = req
        reqs.append(req)

    for prompt in prompts:
        for j in range(s["n"]):
            c = Choice(len(choices), svc.tok, s["stop"], svc.stop_ids)
            choices.append(c)
            seed = None if s["seed"] is None else s["seed"] + j  # n samples must differ
            add(c, prompt, SamplingParams(max_tokens=max_tokens, temperature=s["temperature"], top_k=s["top_k"],
                                          top_p=s["top_p"], repetition_penalty=s["repetition_penalty"], seed=seed,
                                          stop_ids=() if s["ignore_eos"] else svc.stop_ids), logprobs)
    for prompt in score:
        scorings.append(Scoring(len(scorings)))
        add(scorings[-1], prompt, SamplingParams(max_tokens=0), logprobs, scoring=True)
    try:
        submit_group(svc.scheduler, reqs)
    except QueueFull as e:
        raise APIError(429, f"the server is busy ({e}); retry later", code="server_busy",
                       retry_after=e.retry_after) from None
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    return choices, scorings, queue


def submit_group(scheduler, reqs: list[Request]) -> None:
    """All of ``reqs`` or none: ``submit_all`` (the scheduler's shares apply), or, for a scheduler that only
    has ``submit`` (a stand-in), one by one, cancelling those queued when one fails."""
    if hasattr(scheduler, "submit_all"):
        scheduler.submit_all(reqs)
        return
    done = []
    try:
        for req in reqs:
            done.append(scheduler.submit(req))
    except BaseException:
        for req in done:
            req.cancel()
        raise


def cancel(parts) -> None:
    for c in parts:
        if c.req is not None and not c.req.finished:
            c.req.cancel()


async def events(parts, queue, request=None):
    """(part, new text, Step) as tokens arrive until every part has finished; cancels the requests when left
    early. The hang-up is watched alongside the tokens: waiting for a slot sends nothing to fail."""
    gone = asyncio.ensure_future(client_gone(request)) if request is not None else asyncio.Future()
    try:
        while any(c.finish is None for c in parts):
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                get.cancel()
                return
            c, st = get.result()
            if c.finish is not None:
                continue  # late Steps of an answer already cut by a stop string
            text = c.feed(st)
            if c.finish and c.finish.startswith("error"):
                ref = uuid.uuid4().hex[:12]
                log.error("generation failed (reference %s): %s", ref, c.finish)
                raise APIError(500, f"generation failed (reference {ref}; the server's log has the details)",
                               code="engine_error")
            yield c, text, st
    finally:
        gone.cancel()
        cancel(parts)


def usage(prompts, choices) -> dict:
    p = sum(len(x) for x in prompts)
    c = sum(len(ch.tokens) for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def finish_reason(c: Choice) -> str:
    return c.finish if c.finish in ("stop", "length") else "abort"
