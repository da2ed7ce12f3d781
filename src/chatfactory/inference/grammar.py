"""Constrained decoding: a grammar decides which ids a row may sample next.

A ``Constraint`` follows one row's reply: before each sampling step it gives the ids the grammar allows
there (a bitmask, one bit per id), and it advances by the id that was sampled. The sampler sets every
other id's logit to -inf (``mask_logits``), so the reply is always a prefix of a sentence of the grammar
and, once the grammar is complete, only the end-of-turn id is allowed. Log-probabilities reported for
such a row are those of the masked distribution: what the row really sampled from.

The grammars come from llguidance (``Grammars``, one per tokenizer): a JSON Schema (OpenAI's
``response_format`` ``json_schema``), any JSON object (``json_object``) or a Lark grammar (the tool-call
formats). llguidance was chosen over xgrammar and outlines-core by ``bench/grammar_libs.py``: its mask is
as cheap per token as xgrammar's at batch 1 and 16 (both far below a decode step), it installs without
dependencies (xgrammar pulls transformers and triton), it takes Lark grammars beside JSON Schema, and a
grammar compiles in about a millisecond (outlines-core compiles a regular expression: no recursive JSON,
and hundreds of milliseconds a schema on a real vocabulary); docs/serving.md has the figures.

JSON whitespace is bounded (at most ``JSON_WHITESPACE`` characters between two tokens of the document), and so
are integers a schema leaves unbounded (to ±2**53, ``bounded_integers``): a small model allowed either can fill
its whole reply with newlines or digits, a valid prefix forever.
"""

from __future__ import annotations

import json
import threading

import torch

JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,16}"  # between JSON tokens: some layout, never a reply of blanks
SAFE_INTEGER = 2**53  # I-JSON's (RFC 7493) exact integers: what a JavaScript client can read back unchanged


def bounded_integers(schema):
    """A copy of ``schema`` whose integers without a bound get I-JSON's (±2**53): an unbounded integer lets a
    model write digits until max_tokens, a valid prefix forever (a small model does: "5051555555…")."""
    if isinstance(schema, list):
        return [bounded_integers(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_integers(v) for k, v in schema.items()}
    if out.get("type") == "integer":
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -SAFE_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = SAFE_INTEGER
    return out


class GrammarError(ValueError):
    """A grammar or schema the constraint library refuses, with its message (the server: a 400)."""


class Constraint:
    """One row's grammar state: ``fill`` its allowed ids, ``accept`` the sampled one."""

    def __init__(self, matcher, name: str, grammars: Grammars):
        self.matcher, self.name, self.grammars = matcher, name, grammars

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed ids into ``bitmask[row]`` (int32, 32 ids a word, id i at bit i % 32)."""
        import llguidance.torch as lt

        lt.fill_next_token_bitmask(self.matcher, bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by the sampled id; False if the grammar does not allow it (the row is then broken)."""
        return self.matcher.consume_token(token)

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    @property
    def complete(self) -> bool:
        """The grammar is satisfied by what was accepted (the end of turn may come now)."""
        return self.matcher.is_accepting()

    def fork(self) -> Constraint:
        """An independent copy in the same state (``n`` answers to one request: one matcher each)."""
        return Constraint(self.matcher.deep_copy(), self.name, self.grammars)


class Grammars:
    """Builds constraints for one tokenizer. The tokenizer's llguidance form is built on first use and kept
    (it reads the whole vocabulary: about a quarter of a second for 49,152 ids)."""

    def __init__(self, tok):
        self.tok = tok
        self._lltok = None
        self._lock = threading.Lock()
        self._executor = None

    def _tokenizer(self):
        import llguidance

        with self._lock:
            if self._lltok is None:
                # the end-of-turn id is the grammar's end: allowed once the grammar is complete, never before
                self._lltok = llguidance.LLTokenizer(self.tok.hf.to_str(), n_vocab=self.tok.vocab_size,
                                                     eos_token=self.tok.end_id)
                self._executor = llguidance.LLExecutor()
        return self._lltok

    def _matcher(self, grammar: str, name: str) -> Constraint:
        import llguidance

        lltok = self._tokenizer()
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if failed:
            raise GrammarError(messages[0])
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return Constraint(m, name, self)

    def json_schema(self, schema: dict | None = None) -> Constraint:
        """A JSON document valid under ``schema`` (None: any JSON object, OpenAI's ``json_object``)."""
        import llguidance

        if schema is not None and not isinstance(schema, dict):
            raise GrammarError(f"a JSON Schema is a JSON object, not {type(schema).__name__}")
        schema = {"type": "object"} if schema is None else bounded_integers(schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides={"whitespace_pattern": JSON_WHITESPACE})
        except ValueError as e:
            raise GrammarError(str(e)) from None
        return self._matcher(grammar, "json_schema")

    def lark(self, grammar: str, name: str = "lark") -> Constraint:
        """A Lark grammar in llguidance's dialect (``%json {schema}`` embeds a JSON Schema as a rule)."""
        import llguidance

        return self._matcher(llguidance.LLMatcher.grammar_from_lark(grammar), name)

    def fill_all(self, constraints: list[Constraint], bitmask: torch.Tensor) -> None:
        """``bitmask[i]`` for each ``constraints[i]``, computed in parallel (llguidance's executor)."""
        import llguidance.torch as lt

        self._tokenizer()
        if len(constraints) == 1:
            constraints[0].fill(bitmask, 0)
        else:
            lt.fill_next_token_bitmask_par(self._executor, [(c.matcher, i) for i, c in enumerate(constraints)],
                                           bitmask)


def allocate(rows: int, vocab: int) -> torch.Tensor:
    return torch.zeros(rows, (vocab + 31) // 32, dtype=torch.int32)


_BITS = torch.arange(32, dtype=torch.int32)


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 bitmask (B, W) -> bool (B, vocab): True where the id is allowed."""
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1
    return bits.reshape(bitmask.size(0), -1)[:, :vocab].bool()


def mask_logits(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: every id the bitmask does not allow gets -inf (ids past the bitmask's width too)."""
    V = logits.size(-1)
    ok = allowed(bitmask, min(V, bitmask.size(-1) * 32)).to(logits.device)
    if ok.size(-1) < V:
        ok = torch.cat([ok, ok.new_zeros(ok.size(0), V - ok.size(-1))], -1)
    logits.masked_fill_(~ok, float("-inf"))


def constrain(logits: torch.Tensor, constraints: list[Constraint | None]) -> dict[int, str]:
    """In place: each row of ``logits`` (B, V) with a constraint keeps only the ids its grammar allows
    -> {row: why} for rows whose grammar allows nothing (a broken matcher: that request fails alone)."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return {}
    failed = {}
    by_grammars: dict[int, list[int]] = {}
    for i in rows:
        by_grammars.setdefault(id(constraints[i].grammars), []).append(i)
    for members in by_grammars.values():
        cons = [constraints[i] for i in members]
        bitmask = allocate(len(members), cons[0].grammars.tok.vocab_size)
        cons[0].grammars.fill_all(cons, bitmask)
        sub = logits[members]
        mask_logits(sub, bitmask)
        logits[members] = sub
        for j, i in enumerate(members):
            if not bool(bitmask[j].any()):
                failed[i] = f"error: the output grammar allows no token here ({cons[j].error or 'no way on'})"
    return failed
