"""Training-step speed: our GPT (gpt2 flavour) against Hugging Face GPT2LMHeadModel, same process.

Same shape, batch, sequence and optimizer settings; CPU, fp32. Prints tokens/s for each, the ratio,
and our MFU against the fp32 matmul peak measured in this same run (FLOPs counted with the PaLM
convention, 6N + 12·L·d·T per token, for both models).

    .venv/bin/python bench/pretrain_speed.py [--steps 20] [--layers 4 --width 256 --vocab 4096 --batch 16 --seq 256]
    .venv/bin/python bench/pretrain_speed.py --quick   # smoke test (tests/test_benches.py): tiny sizes

Last line: ``RESULT ours_tok_s=… hf_tok_s=… ratio=… mfu=… step_tokens=…`` (step_tokens: batch x seq). Run it
alone: on a 2-core machine anything else running is noise.
"""

import argparse
import time

import torch

from chatfactory.formats.hf import to_hf_config, to_hf_state_dict
from chatfactory.model.gpt import GPT, GPTConfig
from chatfactory.train.meters import measure_matmul_peak

# --quick: a tiny model and batch, 3 timed steps per round
QUICK = dict(layers=2, width=64, vocab=256, batch=2, seq=32, steps=3)


def time_steps(step_fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step_fn()
    best = []
    for _ in range(steps):
        t = time.perf_counter()
        step_fn()
        best.append(time.perf_counter() - t)
    best.sort()
    return sum(best[: max(1, len(best) // 2)]) / max(1, len(best) // 2)  # mean of the faster half


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, seconds (the same code)")
    a = ap.parse_args()
    if a.quick:  # the quick sizes are defaults: an option on the command line still wins
        ap.set_defaults(**QUICK)
        a = ap.parse_args()
    import transformers

    torch.manual_seed(0)
    cfg = GPTConfig(flavour="gpt2", depth=a.layers, n_embd=a.width, vocab_size=a.vocab, block_size=a.seq)
    ours = GPT(cfg)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**to_hf_config(cfg)))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    ours.train(), hf.train()
    x = torch.randint(0, a.vocab, (a.batch, a.seq + 1))
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    opt_args = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    opt_ours = torch.optim.AdamW(ours.parameters(), fused=True, **opt_args)  # what our loop uses
    opt_hf = torch.optim.AdamW(hf.parameters(), **opt_args)  # torch's default (foreach) AdamW

    def step_ours():
        loss = ours(inp, targets=tgt)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        loss = hf(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    tokens = a.batch * a.seq
    peak = measure_matmul_peak(torch.device("cpu"), n=1024, seconds=1.0)
    # interleave the two so drifting clocks or load hit both alike
    t_ours, t_hf = [], []
    for _ in range(3):
        t_ours.append(time_steps(step_ours, a.steps // 3 + 1))
        t_hf.append(time_steps(step_hf, a.steps // 3 + 1))
    ours_s, hf_s = tokens / min(t_ours), tokens / min(t_hf)
    flops = ours.flops_per_token(a.seq)
    mfu = flops * ours_s / peak
    print(f"shape: {a.layers} layers x {a.width} wide, vocab {a.vocab}, batch {a.batch} x {a.seq}; "
          f"{ours.num_params() / 1e6:.2f}M params, {flops / 1e6:.1f} MFLOP/token; "
          f"torch threads {torch.get_num_threads()}")
    print(f"fp32 matmul peak measured: {peak / 1e9:.1f} GFLOP/s")
    print(f"ours: {ours_s:,.0f} tok/s  (MFU {mfu:.1%})")
    print(f"hf:   {hf_s:,.0f} tok/s  (MFU {flops * hf_s / peak:.1%})")
    print(f"ratio ours/hf: {ours_s / hf_s:.3f}")
    print(f"RESULT ours_tok_s={ours_s:.0f} hf_tok_s={hf_s:.0f} ratio={ours_s / hf_s:.3f} mfu={mfu:.3f} "
          f"step_tokens={tokens}")


if __name__ == "__main__":
    main()
