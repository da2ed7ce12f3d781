"""What constrained decoding costs per token: the continuous batch (the server's scheduler, no HTTP) decoding
the same requests with and without an output grammar, at 1 and N concurrent requests, in one process.

Each request asks, through the model's chat template, for a JSON object; the constrained run decodes it
under a JSON Schema (``response_format`` json_schema's grammar, inference/grammar.py), the unconstrained one
freely. Greedy, ``max_tokens`` each; a reply that ends early (its grammar complete) counts only its tokens:
the figure is time per generated token, its ratio constrained / unconstrained. Every constrained reply is
checked: it must parse and be valid under the schema (or be cut at max_tokens).

    .venv/bin/python bench/constrained_overhead.py --run runs/smol --stage sft     # SmolLM2 (a run's stage)
    .venv/bin/python bench/constrained_overhead.py --quick   # smoke test: a random 2-layer model and tokenizer

Last line: ``RESULT overhead_b1=… overhead_bN=… ms_per_token_b1=… ms_per_token_constrained_b1=…
ms_per_token_bN=… ms_per_token_constrained_bN=… valid=… n=…`` (overhead: the ratio, 1.0 = free; valid: the
fraction of constrained replies that parse under the schema). Run it alone: on a 2-core machine anything
else running is noise.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from chatfactory.inference.batching import Request, Scheduler  # noqa: E402
from chatfactory.inference.grammar import Grammars  # noqa: E402
from chatfactory.inference.sampling import SamplingParams  # noqa: E402

QUICK = dict(n=4, tokens=24)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"type": "string", "maxLength": 40},
                                           "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30},
                                                       "maxItems": 4}},
          "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
PEOPLE = ["a retired sailor", "a young painter", "a baker in Lyon", "a chess teacher", "a beekeeper", "a pilot",
          "a marine biologist", "a librarian", "a violin maker", "a mountain guide", "a tailor", "a farmer",
          "a robotics student", "a nurse", "a potter", "a radio host"]


def _load(a):
    if a.quick:
        import itertools

        from chatfactory.data.embedded import embedded_texts
        from chatfactory.model.gpt import GPT, GPTConfig
        from chatfactory.text.tokenizer import Tokenizer

        tok = Tokenizer.train(itertools.islice(embedded_texts(), 2000), vocab_size=512)
        torch.manual_seed(0)
        return GPT(GPTConfig(depth=2, n_embd=64, head_dim=32, vocab_size=512, block_size=512)).eval(), tok
    from chatfactory.store.load import load_model
    from chatfactory.text.tokenizer import Tokenizer

    run = Path(a.run)
    return load_model(run / a.stage, inference=True)[0].eval(), Tokenizer.load(run / "tokenizer.json")


def decode(model, tok, grammars, n: int, tokens: int, constrained: bool):
    """n requests at once through the scheduler -> (seconds, generated tokens, replies)."""
    sched = Scheduler(model, slots=max(n, 1), start=False, vocab_limit=tok.vocab_size)
    outs = [[] for _ in range(n)]
    for i in range(n):
        msgs = [{"role": "user", "content": f"Describe {PEOPLE[i % len(PEOPLE)]} as a JSON object with name, age, "
                                            f"city and hobbies."}]
        p = SamplingParams(max_tokens=tokens, temperature=0, stop_ids=tok.stop_ids)
        sched.submit(Request(tok.chat_prompt(msgs), p, emit=outs[i].append,
                             constraint=grammars.json_schema(SCHEMA) if constrained else None))
    t0 = time.perf_counter()
    sched.run_until_idle()
    dt = time.perf_counter() - t0
    ids = [[s.token for s in o if s.token is not None and s.token not in tok.stop_ids] for o in outs]
    return dt, sum(len(x) + 1 for x in ids), [(tok.decode(x), o[-1].finish) for x, o in zip(ids, outs)]


def valid(text: str, finish: str) -> bool:
    if finish == "length":
        return True  # cut short: a prefix (the grammar allowed every token)
    try:
        import jsonschema_rs

        return jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(text))
    except (ValueError, ImportError):
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a run directory (its tokenizer and --stage)")
    ap.add_argument("--stage", default="sft")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.n, a.tokens = QUICK["n"], QUICK["tokens"]
    elif not a.run:
        ap.error("--run is needed (or --quick)")
    torch.manual_seed(0)
    model, tok = _load(a)
    grammars = Grammars(tok)
    grammars.json_schema(SCHEMA)  # the tokenizer's grammar form, built once (as a server does at first use)
    out, ok = {}, []
    for n in (1, a.n):
        decode(model, tok, grammars, 1, 4, True)  # warm
        for constrained in (False, True):
            dt, count, replies = decode(model, tok, grammars, n, a.tokens, constrained)
            out[(n, constrained)] = dt * 1e3 / count
            if constrained:
                ok += [valid(t, f) for t, f in replies]
            print(f"batch {n:2} {'constrained  ' if constrained else 'unconstrained'}: {count} tokens in {dt:.2f} s, "
                  f"{out[(n, constrained)]:.2f} ms/token", flush=True)
        if n == a.n:
            print("a constrained reply:", replies[0][0][:200])
    r1, rn = out[(1, True)] / out[(1, False)], out[(a.n, True)] / out[(a.n, False)]
    print(f"overhead: batch 1 {r1:.3f}x, batch {a.n} {rn:.3f}x; valid {sum(ok)}/{len(ok)}")
    print(f"RESULT overhead_b1={r1:.3f} overhead_bN={rn:.3f} ms_per_token_b1={out[(1, False)]:.2f} "
          f"ms_per_token_constrained_b1={out[(1, True)]:.2f} ms_per_token_bN={out[(a.n, False)]:.2f} "
          f"ms_per_token_constrained_bN={out[(a.n, True)]:.2f} valid={sum(ok) / len(ok):.3f} n={a.n}")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
