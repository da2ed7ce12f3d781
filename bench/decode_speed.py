"""Decode speed: our engine against Hugging Face ``generate(use_cache=True)``, same weights, same process.

The demo-sized ``gpt2`` flavour (depth 4, width 256, vocab 4096) is loaded into
``transformers.GPT2LMHeadModel`` with ``hf.to_hf_state_dict``; both decode greedily, CPU, fp32, from the
same prompts, exactly ``--new`` tokens (no stop token). Batch 1 and batch 8, each at 1 and 2 torch
threads. Prints tokens/s (new tokens over the whole generate call, prefill included), the ratios
(ours at the engine's default thread count against Hugging Face at its best), and checks that both
produced the same tokens.

Ours runs ``Engine(model, compile=True)``, the fast decode step of ``chatfactory/inference/decode_step.py``:
at batch 1 the step compiled by ``torch.compile``, at batch 8 an eager step on oneDNN-packed
weights. Compiling (and packing) happens on the first generation of each batch size, and again
when the thread count changes; that call is the warm-up every measurement here starts with (for
both sides), so compile time is excluded from tokens/s, and the first one is printed on its own
("first call ... s"). ``--no-compile`` measures the eager engine.

    .venv/bin/python bench/decode_speed.py [--new 256 --prompt 32 --repeats 3 --no-compile]
    .venv/bin/python bench/decode_speed.py --quick     # smoke test (tests/test_benches.py): tiny sizes, 1 thread

Last line: ``RESULT ratio_b1=… ratio_b8=… same_tokens=… configs=…`` (same_tokens: the batch x thread-count
configurations, of ``configs``, where both sides produced the same tokens). Run it alone: on a 2-core
machine anything else running is noise.
"""

import argparse
import time

import torch

from chatfactory.formats.hf import to_hf_config, to_hf_state_dict
from chatfactory.inference.engine import Engine, default_threads
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig

# --quick: a tiny model, a few tokens, one thread count (the sweep still runs, once)
QUICK = dict(layers=2, width=64, vocab=256, prompt=8, new=8, repeats=1, threads="1")


def best_time(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (allocations, thread pool; for ours the first call of a batch size compiles)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--no-compile", action="store_true", help="measure the eager engine (no torch.compile)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, seconds (the same code)")
    a = ap.parse_args()
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    import transformers

    torch.manual_seed(0)
    cfg = GPTConfig(flavour="gpt2", depth=a.layers, n_embd=a.width, vocab_size=a.vocab, block_size=a.prompt + a.new)
    ours = GPT(cfg).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**to_hf_config(cfg))).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    hf.generation_config.pad_token_id = 0
    engine = Engine(ours, compile=not a.no_compile)
    torch_default = torch.get_num_threads()  # what the engine uses when default_threads says None
    results, same_tokens = {}, 0
    for batch in (1, 8):
        prompts = torch.randint(0, a.vocab, (batch, a.prompt))
        params = SamplingParams(max_tokens=a.new, temperature=0)

        def run_hf(prompts=prompts):
            with torch.inference_mode():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=a.new,
                                  min_new_tokens=a.new, do_sample=False, use_cache=True)
            return out[:, a.prompt :].tolist()

        for n, threads in enumerate(int(t) for t in a.threads.split(",")):
            torch.set_num_threads(threads)
            engine.threads = {batch: threads}  # pin the engine to this count for the sweep
            if n == 0 and engine.compiled is not None:  # a batch size's first call compiles (or packs): time it apart
                t = time.perf_counter()
                engine.generate(prompts.tolist(), SamplingParams(max_tokens=2, temperature=0))
                print(f"batch {batch}: first call (compile or weight packing) {time.perf_counter() - t:.1f} s, "
                      f"excluded from tokens/s")
            t_ours, out_ours = best_time(
                lambda prompts=prompts, params=params: engine.generate(prompts.tolist(), params), a.repeats)
            t_hf, out_hf = best_time(run_hf, a.repeats)
            same = out_ours == out_hf
            same_tokens += same
            results[(batch, threads)] = (batch * a.new / t_ours, batch * a.new / t_hf)
            print(f"batch {batch} threads {threads}: ours {batch * a.new / t_ours:8.1f} tok/s   "
                  f"HF {batch * a.new / t_hf:8.1f} tok/s   ratio {t_hf / t_ours:5.2f}x   same tokens: {same}")
    torch.set_num_threads(torch_default)
    ratios = {}
    for batch in (1, 8):
        best_ours_threads = max((t for (b, t) in results if b == batch), key=lambda t: results[(batch, t)][0])
        default = default_threads(batch) or torch_default
        if (batch, default) not in results:
            default = best_ours_threads
        hf_best = max(results[(batch, t)][1] for (b, t) in results if b == batch)
        ratios[batch] = results[(batch, default)][0] / hf_best
        print(f"batch {batch}: fastest thread count for ours = {best_ours_threads}, engine default = {default}; "
              f"ours (default) / HF (best) = {ratios[batch]:.2f}x")
    print(f"RESULT ratio_b1={ratios[1]:.2f} ratio_b8={ratios[8]:.2f} same_tokens={same_tokens} configs={len(results)}")


if __name__ == "__main__":
    main()
