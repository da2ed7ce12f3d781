"""The calculator a model calls while it writes: ``<calc>EXPRESSION</calc>``, then the engine writes the result
` <result>VALUE</result>` into the reply itself (the model never samples those tokens) and the model goes on.

``evaluate`` is a safe evaluator: Python's parser reads the expression (``ast.parse(mode="eval")``), and only
numbers, parentheses, unary +/-, and + - * / // % ** are walked; names, calls, attributes, strings and
everything else are refused, as are expressions longer than ``MAX_CHARS``, exponents past ``MAX_POWER`` and
results past ``MAX_DIGITS`` digits (no ``eval``: the expression is the model's, and so untrusted).

``CalcRow`` watches a row's reply: when the text it has written ends with ``</calc>``, ``add`` gives the
ids to force (the result, or `` <result>error: …</result>``). The format's boundaries are token boundaries for
a byte-level BPE (``>`` is a piece of its own before a space), so the model writes ``</calc>`` whole and the
forced text starts a fresh piece. Training marks the forced tokens (``forced_mask``) so that no loss,
ratio, KL or value is computed on them.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import warnings
from fractions import Fraction

OPEN, CLOSE = "<calc>", "</calc>"
RESULT = " <result>{}</result>"
MAX_CHARS = 200
MAX_POWER = 64
MAX_DIGITS = 60
RESULT_PATTERN = re.compile(rb" <result>[^<]*</result>")  # (on bytes: a result has no "<" inside)
_OPEN, _CLOSE = OPEN.encode(), CLOSE.encode()

_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


class CalcError(ValueError):
    pass


def evaluate(expression: str) -> str:
    """An arithmetic expression -> its value as text (an integer, or a decimal rounded to 6 places);
    CalcError naming what is refused."""
    if len(expression) > MAX_CHARS:
        raise CalcError(f"expression longer than {MAX_CHARS} characters")
    try:
        with warnings.catch_warnings():  # ("invalid decimal literal" and the like: the model's typo, not ours)
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):  # (ValueError: a NUL byte in the expression)
        raise CalcError("not an arithmetic expression") from None
    value = _walk(tree.body)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


def _bounded(v: Fraction) -> Fraction:
    if abs(v.numerator) >= 10 ** MAX_DIGITS or v.denominator >= 10 ** MAX_DIGITS:
        raise CalcError(f"a number past {MAX_DIGITS} digits")
    return v


def _walk(node) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if not math.isfinite(node.value):  # a literal past float's range ("1e999") reads as infinity
            raise CalcError("a number past float's range")
        return _bounded(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _walk(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        a, b = _walk(node.left), _walk(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise CalcError("division by zero")
        if isinstance(node.op, ast.Pow):
            if b.denominator != 1 or abs(b) > MAX_POWER:
                raise CalcError(f"exponents are whole numbers up to {MAX_POWER}")
            if a == 0 and b < 0:
                raise CalcError("division by zero")
        v = _BIN[type(node.op)](a, b)
        if isinstance(node.op, ast.FloorDiv):
            v = Fraction(v)
        return _bounded(v)
    raise CalcError(f"{type(node).__name__} is not arithmetic")


def result_text(expression: str) -> str:
    """What the engine writes after ``</calc>``: the value, or the error, in the result tags."""
    try:
        return RESULT.format(evaluate(expression))
    except CalcError as e:
        return RESULT.format(f"error: {e}")


def call(expression: str) -> str:
    """A call as the model writes it (demonstrations)."""
    return f"{OPEN}{expression}{CLOSE}"


class CalcRow:
    """A row of generation with the calculator: ``add(id)`` takes each id the model sampled and returns the
    ids to force next (the call's result, at most ``max_calls`` times a reply) or []; forced ids are not passed
    back to ``add``. A call is answered once: its result follows it, so the reply no longer ends with it."""

    def __init__(self, tok, max_calls: int = 8):
        self.tok, self.max_calls, self.calls = tok, max_calls, 0
        self.data = b""

    def add(self, token: int) -> list[int]:
        self.data += self.tok.token_bytes[token]
        if not self.data.endswith(_CLOSE) or self.calls >= self.max_calls:
            return []
        start = self.data.rfind(_OPEN)
        if start < 0:
            return []
        self.calls += 1
        forced = result_text(self.data[start + len(_OPEN):-len(_CLOSE)].decode("utf-8", "replace"))
        self.data += forced.encode()
        return self.tok.encode(forced)


def forced_mask(tok, ids: list[int]) -> list[bool]:
    """Per id: does it lie (even in part) in a result the engine wrote after a call? Those are not the model's:
    no loss, ratio, KL or value on them."""
    tb = tok.token_bytes
    data = b"".join(tb[i] for i in ids)
    if _CLOSE not in data:  # no call: nothing forced (most replies)
        return [False] * len(ids)
    spans = [(m.start(), m.end()) for m in RESULT_PATTERN.finditer(data) if data[:m.start()].endswith(_CLOSE)]
    out, pos = [], 0
    for i in ids:
        a, b = pos, pos + len(tb[i])
        out.append(any(a < e and s < b for s, e in spans))
        pos = b
    return out
