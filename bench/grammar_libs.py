"""Which grammar library constrains decoding: llguidance, xgrammar and outlines-core side by side, on our
own tokenizer, the same schema and the same token sequence.

For each library: the time to compile a JSON schema for the tokenizer (once per request in a server), and
the time per generated token to compute the allowed-token mask of every row and advance every row by its
token, at batch 1 and batch 16 (16 rows, each its own matcher, as a continuous batch holds them), plus the
time to apply the masks to a batch of logits. The rows walk one schema-valid JSON document token by token
(our tokenizer's own ids for it), so every mask is a real mid-document state. outlines-core compiles a
regular expression: it cannot take ``json_object`` (any JSON value: recursive), so that row says so.

    .venv/bin/python bench/grammar_libs.py --tokenizer runs/smol/tokenizer.json   # SmolLM2's 49,152 ids
    .venv/bin/python bench/grammar_libs.py --quick   # smoke test: a small tokenizer trained here

xgrammar and outlines-core are not dependencies of chatfactory: `pip install xgrammar outlines-core` first
(xgrammar with ``--no-deps`` and ``apache-tvm-ffi`` avoids pulling triton); a library that is missing is
reported as skipped. Last line: ``RESULT lib=... b1_ms_LIB=... b16_ms_LIB=... compile_ms_LIB=...
apply16_ms_LIB=... vocab=... tokens=... skipped=...`` (ms per generated token; nan where not measured).
Run it alone: on a 2-core machine anything else running is noise.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from chatfactory.text.tokenizer import Tokenizer  # noqa: E402

QUICK = dict(repeats=1, batch=4)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"],
       "address": {"city": "London", "zip": "W1"}, "active": True}


def _tokenizer(path: str | None) -> Tokenizer:
    if path:
        return Tokenizer.load(path)
    import itertools

    from chatfactory.data.embedded import embedded_texts

    return Tokenizer.train(itertools.islice(embedded_texts(), 4000), vocab_size=2048)


# ---------------------------------------------------------------- one library each: compile, mask + advance

class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer):
        import llguidance
        import llguidance.torch as lt

        self.llg, self.lt = llguidance, lt
        self.tok = llguidance.LLTokenizer(tok.hf.to_str(), eos_token=tok.end_id)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict | None):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"})
        m = self.llg.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        return m

    def bitmask(self, n, vocab):
        return self.lt.allocate_token_bitmask(n, vocab)

    def fill(self, ms, bitmask):
        if len(ms) == 1:
            self.lt.fill_next_token_bitmask(ms[0], bitmask, 0)
        else:
            self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], bitmask)

    def advance(self, ms, token):
        for m in ms:
            assert m.consume_token(token), m.get_error()

    def apply(self, logits, bitmask):
        self.lt.apply_token_bitmask_inplace(logits, bitmask)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo(tok.token_bytes, xgrammar.VocabType.RAW, vocab_size=tok.vocab_size,
                                      stop_token_ids=[tok.end_id])
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, schema):
        g = (self.compiler.compile_json_schema(json.dumps(schema)) if schema is not None
             else self.compiler.compile_builtin_json_grammar())
        return self.xgr.GrammarMatcher(g)

    def bitmask(self, n, vocab):
        return self.xgr.allocate_token_bitmask(n, vocab)

    def fill(self, ms, bitmask):
        for i, m in enumerate(ms):
            m.fill_next_token_bitmask(bitmask, i)

    def advance(self, ms, token):
        for m in ms:
            assert m.accept_token(token)

    def apply(self, logits, bitmask):
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: Tokenizer):
        import outlines_core

        self.oc = outlines_core
        ids: dict[bytes, list[int]] = {}
        for i, b in enumerate(tok.token_bytes):
            if i != tok.end_id and b and i not in set(tok.special.values()):
                ids.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(tok.end_id, ids)
        self.size = tok.vocab_size

    def compile(self, schema):
        if schema is None:
            return None  # a regular expression cannot hold any JSON value (recursive)
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def bitmask(self, n, vocab):
        return torch.zeros((n, (vocab + 31) // 32), dtype=torch.int32)

    def fill(self, ms, bitmask):
        for i, m in enumerate(ms):
            row = bitmask[i]
            m.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def advance(self, ms, token):
        for m in ms:
            m.advance(token)

    def apply(self, logits, bitmask):
        from outlines_core.kernels.torch import apply_token_bitmask_inplace

        apply_token_bitmask_inplace(logits, bitmask)


def measure(lib, tok: Tokenizer, ids: list[int], batch: int, repeats: int) -> dict:
    out = {}
    t0 = time.perf_counter()
    lib.compile(SCHEMA)
    out["compile_ms"] = (time.perf_counter() - t0) * 1e3
    try:
        lib.compile(None)
        out["json_object"] = "yes"
    except Exception as e:  # (outlines-core returns None instead)
        out["json_object"] = f"no ({type(e).__name__})"
    if lib.compile(None) is None:
        out["json_object"] = "no (regex: not recursive)"
    V = tok.vocab_size
    for n in (1, batch):
        times = []
        for _ in range(repeats):
            ms = [lib.compile(SCHEMA) for _ in range(n)] if n > 1 else [lib.compile(SCHEMA)]
            bitmask = lib.bitmask(n, V)
            t0 = time.perf_counter()
            for t in ids:
                lib.fill(ms, bitmask)
                allowed = bool((bitmask[0, t // 32] >> (t % 32)) & 1)
                assert allowed, f"{lib.name}: token {t} ({tok.token_bytes[t]!r}) not allowed by its own mask"
                lib.advance(ms, t)
            times.append((time.perf_counter() - t0) * 1e3 / len(ids))
        out[f"b{n}_ms"] = statistics.median(times)
    logits = torch.randn(batch, V)
    bitmask = lib.bitmask(batch, V)
    lib.apply(logits.clone(), bitmask)  # warm (a compiled kernel)
    t0 = time.perf_counter()
    for _ in range(20):
        lib.apply(logits.clone(), bitmask)
    out["apply_ms"] = (time.perf_counter() - t0) * 1e3 / 20
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", help="a tokenizer.json (a run's); default: a small one trained here")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.repeats, a.batch = QUICK["repeats"], QUICK["batch"]
    torch.set_num_threads(2)
    tok = _tokenizer(a.tokenizer)
    ids = tok.encode(json.dumps(DOC))
    print(f"tokenizer: {tok.vocab_size} ids; the document: {len(ids)} tokens; batch {a.batch}")
    results, skipped = {}, []
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        try:
            lib = cls(tok)
        except ImportError as e:
            print(f"{cls.name}: skipped ({e})")
            skipped.append(cls.name)
            continue
        r = measure(lib, tok, ids, a.batch, a.repeats)
        results[cls.name] = r
        print(f"{cls.name:14} compile {r['compile_ms']:8.1f} ms   mask+advance per token: batch 1 "
              f"{r['b1_ms']:.3f} ms, batch {a.batch} {r[f'b{a.batch}_ms']:.3f} ms   apply (batch {a.batch}) "
              f"{r['apply_ms']:.3f} ms   json_object: {r['json_object']}")
    nan = float("nan")
    fields = []
    for name in ("llguidance", "xgrammar", "outlines-core"):
        r, key = results.get(name, {}), name.replace("-", "_")
        fields += [f"b1_ms_{key}={r.get('b1_ms', nan):.3f}", f"b{a.batch}_ms_{key}={r.get(f'b{a.batch}_ms', nan):.3f}",
                   f"compile_ms_{key}={r.get('compile_ms', nan):.1f}", f"apply_ms_{key}={r.get('apply_ms', nan):.3f}"]
    best = min(results, key=lambda k: results[k][f"b{a.batch}_ms"]) if results else "none"
    print(f"RESULT fastest={best} " + " ".join(fields) + f" vocab={tok.vocab_size} tokens={len(ids)} "
          f"skipped={','.join(skipped) or 'none'}")
    return 0 if results and all(not math.isnan(r["b1_ms"]) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
