"""Multi-digit arithmetic that the model answers with the calculator (inference/calculator.py): the task family
``calc`` that ``pipeline.calculator: true`` adds to the embedded tasks.

A demonstration calls the calculator, and its result is the answer::

    user:      What is 347 * 29?
    assistant: <calc>347*29</calc> <result>10063</result>

The result is the engine's (forced, not sampled: no loss on it, calculator.forced_mask), so what the model
learns is to copy the operands into a call: multi-digit products are out of reach of a small model's own
arithmetic, not of its copying. Without the calculator the model writes the result tags itself, and its own
number is its answer.

Held out by operand values, not by wording: every operand value (10-999) is assigned to training or to
evaluation by a hash of the value; a problem whose two operands are both evaluation values is ``heldout``
(or ``dev``), one whose two operands are both training values is ``sft`` or ``rl``, and a problem that mixes
them is not used. So no held-out operand ever occurs in a training prompt or demonstration.
"""

from __future__ import annotations

import hashlib
import random

from ..inference.calculator import call, result_text

OPS = {"+": (lambda a, b: a + b, ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}."]),
       "-": (lambda a, b: a - b, ["What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."]),
       "*": (lambda a, b: a * b, ["What is {a} * {b}?", "Multiply {a} by {b}.", "Compute {a} times {b}."])}
EVAL_PERCENT = 25  # of operand values: held out (and dev)


def _h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def value_side(v: int) -> str:
    """Which side an operand value belongs to: "eval" (held-out and dev problems) or "train"."""
    return "eval" if _h(f"calc-operand:{v}") % 100 < EVAL_PERCENT else "train"


def reference(a: int, op: str, b: int) -> str:
    """The call and its result, nothing else: the result is the answer the reply gives (the rubric reads it as
    such), so the model never copies a long number it did not compute. Nothing follows the result but the end
    of turn (a character after ``</result>`` could merge with it into one token across the forced boundary)."""
    expr = f"{a}{op}{b}"
    return f"{call(expr)}{result_text(expr)}"


def calc_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt rows of ``split`` (sft, rl, dev, heldout): operands of 2 or 3 digits, the three operations in
    turn; the same rows for the same seed on every machine."""
    side = "eval" if split in ("dev", "heldout") else "train"
    rng = random.Random(f"calc:{seed}:{split}")
    pool = [v for v in range(10, 1000) if value_side(v) == side]
    rows, seen = [], set()
    while len(rows) < n:
        op = "+-*"[len(rows) % 3]
        a, b = rng.choice(pool), rng.choice(pool)
        if op == "-" and b > a:
            a, b = b, a  # non-negative answers
        phrasing = OPS[op][1][rng.randrange(len(OPS[op][1]))]
        text = phrasing.format(a=a, b=b)
        # dev and heldout share the evaluation values: a problem's own hash decides between them (as sft / rl)
        which = ("dev" if _h(text) % 3 == 0 else "heldout") if side == "eval" else (
            "sft" if _h(text) % 2 == 0 else "rl")
        if which != split or text in seen:
            continue
        seen.add(text)
        rows.append({"messages": [{"role": "user", "content": text}], "task": "calc",
                     "answer": str(OPS[op][0](a, b)), "reference": reference(a, op, b), "decline": False,
                     "lang": "en", "operands": [a, b]})
    return rows
