"""chatfactory's own CPU kernels for int8/int4 weights (``kernels.cpp`` beside this file), built on first use.

PyTorch's packed int4/int8 CPU kernels pay a fixed cost per call that dominates a decode step, where each of a
model's ~120 linears multiplies one or a few rows. ``kernels.cpp`` does what llama.cpp does instead: the
activations are quantized to int8 in blocks of 32 columns and every block of weight codes becomes an integer dot
product (AVX-512 VNNI or AVX2 where the CPU has them, plain loops where not). ``model/quant.py`` runs its int8
layers on them up to ``MAX_ROWS`` rows (a decode step's batch) and takes one BLAS product on the dequantized
weight for more (a prefill). Its int4 layers take them by default where the 512-bit path is built
(``simd_bits() == 512``), PyTorch's packed int4 kernel elsewhere (``set_kernels`` chooses either way): how the
two compare, by rows, is in docs/small-hardware.md (``bench/quant_kernels.py``).

The source is compiled once per machine with ``-O3 -march=native`` by ``torch.utils.cpp_extension`` (a C++
compiler is needed, as for ``torch.compile``) into its cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), under a name that holds a hash of the source and of the CPU's flags, so a
changed file or another CPU builds anew. Where building fails, ``available()`` says why once and the layers keep
PyTorch's kernels. The ops are ``torch.ops.chatfactory.*`` with shape functions, so a compiled decode step
(inference/decode_step.py) calls them inside its graph.
"""

from __future__ import annotations

import hashlib
import platform
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
# Rows up to which a layer takes these kernels: each pass over a weight serves 4 rows from registers, and up to
# this many rows the int8 products beat PyTorch's packed kernel and a BLAS product on the dequantized weight
# (docs/small-hardware.md).
MAX_ROWS = 16
BLOCK = 32  # activation block (columns): an int4 group or an int8 layer's width must be a multiple of it
MAX_WIDTH = 512 * BLOCK  # the int4 kernel keeps a row's per-block scales on the stack (kernels.cpp MAX_BLOCKS)

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str, once tried in this process


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _name() -> str:
    h = hashlib.sha256(SOURCE.read_bytes() + _cpu_flags().encode() + torch.__version__.encode()).hexdigest()[:12]
    return f"chatfactory_kernels_{h}"


def _register_shapes() -> None:
    """Shape functions, so torch.compile traces the ops without running them."""

    @torch.library.register_fake("chatfactory::int4_gemv")
    def _int4(x, q, sz, group):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("chatfactory::int8_gemv")
    def _int8(x, q, scales):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("chatfactory::int4_dequant")
    def _deq(q, sz, group):
        return q.new_empty(q.shape[0], q.shape[1] * 2, dtype=torch.float32)


def available() -> bool:
    """Whether the kernels are loaded in this process; builds them on the first call (a warning if that fails)."""
    with _lock:
        if "ok" not in _state:
            try:
                from torch.utils.cpp_extension import load

                load(_name(), [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                     extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
                _register_shapes()
                _state.update(ok=True, why="")
            except Exception as e:  # no compiler, a failed build: PyTorch's kernels serve instead
                first = (str(e).strip().splitlines() or [""])[0][:200]
                _state.update(ok=False, why=f"{type(e).__name__}: {first}")
                warnings.warn(f"chatfactory's int8/int4 kernels not built ({_state['why']}); using PyTorch's",
                              RuntimeWarning, stacklevel=2)
        return _state["ok"]


def simd_bits() -> int:
    """The widest integer products the built kernels use: 512 (AVX-512 VNNI), 256 (AVX2) or 0 (plain loops);
    0 too where they are not built."""
    return int(torch.ops.chatfactory.simd_bits()) if available() else 0


def int4_matmul(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """x (M, K) fp32 times int4 codes ``q`` (N, K/2), (scale, offset) pairs ``sz`` (N, K/group, 2) bf16 -> (M, N)."""
    return torch.ops.chatfactory.int4_gemv(x, q, sz, group)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 times int8 codes ``q`` (N, K) with per-row ``scales`` (N,) fp32 -> (M, N)."""
    return torch.ops.chatfactory.int8_gemv(x, q, scales)


def int4_dequantize(q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The fp32 weight (N, K) of int4 codes ``q`` (N, K/2) and pairs ``sz`` (N, K/group, 2)."""
    return torch.ops.chatfactory.int4_dequant(q, sz, group)
