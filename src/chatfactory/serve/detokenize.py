"""How sampled ids become the text a client sees: ``Detokenizer`` (whole characters, cut at stop strings) and
``Choice`` (one of a request's ``n`` answers being collected)."""

from __future__ import annotations

from ..inference.batching import Request, Step
from ..text.tokenizer import TextStream, Tokenizer


class Detokenizer:
    """Token ids -> text deltas, whole characters only (``TextStream``: half a Chinese character or
    emoji is held until the next token completes it), cut at the first stop string.

    Text that could still turn out to be the start of a stop string is held back until it cannot. A
    stop string is matched on characters, so one whose last character is split across tokens matches
    once that character is whole; the rest of the token that completed it is dropped with the stop.
    ``final`` flushes: bytes that never became a character show as U+FFFD, as ``Tokenizer.decode``."""

    def __init__(self, tok: Tokenizer, stops: list[str]):
        self.tok, self.stops = tok, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.stream = TextStream(tok)
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int | None, final: bool = False) -> str:
        if self.stopped:
            return ""
        if token is not None:
            self.text += self.stream.add(token)
        if final:
            self.text += self.stream.finish()
        cut = min((i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
        end = len(self.text) if (final or self.stopped) else len(self.text) - self.hold
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out


class Choice:
    """One sampled answer being collected (one of ``n``)."""

    def __init__(self, index: int, tok: Tokenizer, stops: list[str], stop_ids: tuple[int, ...]):
        self.index, self.tok, self.stop_ids = index, tok, stop_ids
        self.detok = Detokenizer(tok, stops)
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float | None, list | None]] = []
        self.finish: str | None = None
        self.req: Request | None = None

    def feed(self, step: Step) -> str:
        """Take the scheduler's Step -> new text for the client ('' if none yet)."""
        text = ""
        if step.token is not None:
            self.tokens.append(step.token)
            self.logprobs.append((step.token, step.logprob, step.top))  # a stop id too, as OpenAI lists it
            if step.token not in self.stop_ids:
                text = self.detok.add(step.token)
        if self.detok.stopped:  # a stop string: the rest of this answer is not wanted
            self.finish = "stop"
            if self.req is not None:
                self.req.cancel()
        elif step.finish:
            text += self.detok.add(None, final=True)
            self.finish = step.finish
            if self.detok.stopped:
                self.finish = "stop"
        return text
