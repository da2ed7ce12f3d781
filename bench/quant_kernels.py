"""int8/int4 kernels at decode batch sizes: chatfactory's own (model/kernels.cpp) against PyTorch's, same process.

A decode step multiplies every weight of the model once by 1-16 activation rows, so what it costs is the whole
model's weights streamed through the kernel, not one layer's weights hot in cache. This bench does that: the
int4 linears of ``--layers`` distinct transformer blocks of SmolLM2-135M's shapes (width 576, MLP 1536, 9 query
and 3 key/value heads of 64: QKV 576->960, out 576->576, gate/up 576->3072, down 1536->576; random weights,
int4 groups of 32) called in model order, and the int8 head (576 -> vocab 49,152) on its own, at each row count
in ``--rows``. Our kernels (activations quantized to int8 blocks, integer dot products: 512-bit where the CPU has
AVX-512 VNNI, else AVX2) against PyTorch's packed int4 kernel (``_weight_int4pack_mm_for_cpu``, bfloat16
activations); the head on our kernel, which int8 layers take by default.
Prints milliseconds per pass over the model's int4 linears and per head call, the ratio PyTorch's / ours
(> 1: ours faster), and the kernels' SIMD width beside the host's fp32 matmul peak.

    .venv/bin/python bench/quant_kernels.py [--layers 30 --rows 1,2,4,8,16 --repeats 10]
    .venv/bin/python bench/quant_kernels.py --quick     # smoke test (tests/test_benches.py): 2 blocks, 2 row counts

Last line: ``RESULT int4_own_vs_torch_b1=… int4_own_vs_torch_b16=… int4_own_ms_b1=… int4_torch_ms_b1=…
int8_head_ms_b1=… int8_head_ms_b16=… simd_bits=… matmul_peak_gflops=…`` (the b16 keys at the largest row count
asked for). Run it alone: on a 2-core machine anything else running is noise.
"""

import argparse
import time

import torch

from chatfactory.model import kernels
from chatfactory.model.quant import QuantLinear
from chatfactory.train.meters import measure_matmul_peak

# --quick: two blocks, two row counts, one repeat (every part runs)
QUICK = dict(layers=2, rows="1,4", repeats=1)
WIDTH, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB, GROUP = 576, 1536, 9, 3, 64, 49152, 32


def block_shapes() -> list[tuple[int, int]]:
    """(in, out) of one block's linears, in the order a step calls them."""
    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    return [(WIDTH, qkv), (HEADS * HEAD_DIM, WIDTH), (WIDTH, 2 * MLP), (MLP, WIDTH)]


def layers(n_blocks: int, own: bool) -> list[QuantLinear]:
    torch.manual_seed(0)  # the same weights on both sides
    out = []
    for _ in range(n_blocks):
        for k, n in block_shapes():
            q = QuantLinear.from_weight(torch.randn(n, k) * 0.02, None, 4, GROUP)
            q.use_own_kernels = own
            q.relayout()
            out.append(q)
    return out


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, the thread pool
    best = float("inf")
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30, help="transformer blocks (SmolLM2-135M has 30)")
    ap.add_argument("--rows", default="1,2,4,8,16", help="activation rows per call (a decode step's batch)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="smoke test: " + str(QUICK))
    a = ap.parse_args()
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    if not kernels.available():
        raise SystemExit("chatfactory's kernels did not build here (a C++ compiler is needed): nothing to compare")
    peak = measure_matmul_peak(torch.device("cpu"))
    bits = kernels.simd_bits()
    print(f"host: torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s; our kernels' integer products: {bits or 'plain loops'}"
          f"{'-bit' if bits else ''}")
    own, theirs = layers(a.layers, True), layers(a.layers, False)
    assert all(q.layout == "own" for q in own) and all(q.layout == "cpu" for q in theirs)
    head = QuantLinear.from_weight(torch.randn(VOCAB, WIDTH) * 0.02, None, 8)
    head.use_own_kernels = True
    head.relayout()
    mb = sum(q.qweight.numel() + q.scales_zeros.numel() * 2 for q in own) / 2**20
    print(f"{a.layers} blocks: {len(own)} int4 linears, {mb:.1f} MiB of codes and scales; head int8 "
          f"{head.qweight.numel() / 2**20:.1f} MiB")
    rows = [int(r) for r in a.rows.split(",")]
    res = {}
    with torch.no_grad():
        for m in rows:
            xs = {k: torch.randn(m, k) for k in (WIDTH, MLP)}
            xb = {k: v.to(torch.bfloat16) for k, v in xs.items()}

            def ours(xs=xs):
                for q in own:
                    kernels.int4_matmul(xs[q.in_features], q.qweight, q.scales_zeros, GROUP)

            def pytorch(xb=xb):
                for q in theirs:
                    torch.ops.aten._weight_int4pack_mm_for_cpu(xb[q.in_features], q.qweight, GROUP,
                                                               q._kernel_scales_for(torch.bfloat16))

            x = xs[WIDTH]
            t_own, t_torch = best_ms(ours, a.repeats), best_ms(pytorch, a.repeats)
            t_head = best_ms(lambda x=x: kernels.int8_matmul(x, head.qweight, head.scales), a.repeats)
            res[m] = (t_own, t_torch, t_head)
            print(f"rows {m:2d}: int4 linears ours {t_own:7.2f} ms, PyTorch's {t_torch:7.2f} ms "
                  f"(x{t_torch / t_own:.2f}); int8 head ours {t_head:6.2f} ms", flush=True)
    lo, hi = rows[0], rows[-1]
    r = {"int4_own_vs_torch_b1": res[lo][1] / res[lo][0], "int4_own_vs_torch_b16": res[hi][1] / res[hi][0],
         "int4_own_ms_b1": res[lo][0], "int4_torch_ms_b1": res[lo][1],
         "int8_head_ms_b1": res[lo][2], "int8_head_ms_b16": res[hi][2],
         "simd_bits": bits, "matmul_peak_gflops": peak / 1e9}
    print("RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
