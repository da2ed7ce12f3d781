"""Simulated raters: people voting in the web UI's compare mode, played by a scorer (the rubric by default).

The flywheel (learn.py) trains on people's votes; to test it end to end without people, a rater reads two
answers to a prompt and picks the better one by a scorer, with some votes at random — real raters are
noisy (InstructGPT's labelers agreed with each other ~73% of the time). Kinds of rater:

    gold        the scorer's verdict: "a" or "b" by the higher score, "tie" when equal and both passable,
                "both_bad" when equal and both below ``bad_below``; a share ``noise`` of votes is random
    longer      always prefers the longer answer (the length-hacking rater the gate must not follow)
    shuffled    a random choice every time (the control round: votes that carry no preference)

    rng = random.Random(0)
    choice = rater_choice("gold", row, answer_a, answer_b, rng)       # "a" | "b" | "tie" | "both_bad"
    body = vote_body(row, answer_a, answer_b, choice, shown_left=rng.randrange(2))
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .rubric import rubric_score

KINDS = ("gold", "longer", "shuffled")
CHOICES = ("a", "b", "tie", "both_bad")


def rater_choice(kind: str, row: dict, a: str, b: str, rng: random.Random, noise: float = 0.15,
                 scorer: Callable[[dict, str], float] = rubric_score, bad_below: float = 0.3) -> str:
    """One vote on answers ``a`` and ``b`` to ``row``'s prompt by a rater of ``kind`` (see the docstring)."""
    if kind not in KINDS:
        raise ValueError(f"rater kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "shuffled" or (kind == "gold" and rng.random() < noise):
        return rng.choice(CHOICES)
    if kind == "longer":
        return "a" if len(a) > len(b) else "b" if len(b) > len(a) else "tie"
    x, y = scorer(row, a), scorer(row, b)
    if x == y:
        return "both_bad" if x < bad_below else "tie"
    return "a" if x > y else "b"


def vote_body(row: dict, a: str, b: str, choice: str, shown_left: int = 0, models=None) -> dict:
    """The ``POST /v1/feedback`` body of a compare-mode vote (serve/feedback.py): answers in the order the
    model gave them, ``shown_left`` the index of the one the page showed on the left."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    body = {"kind": "comparison", "messages": row["messages"], "answers": [a, b], "choice": choice,
            "shown_left": shown_left}
    if models:
        body["models"] = list(models)
    return body
