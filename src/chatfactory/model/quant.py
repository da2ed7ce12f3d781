"""Weight-only int8 / int4 quantization of the GPT's linear layers, for inference.

Every ``nn.Linear`` of the transformer blocks (and, with ``include_head=True``, the LM head) becomes a
``QuantLinear`` holding integer weights; activations, norms, embeddings and the KV cache stay in floating
point. Two schemes:

* **int8**: symmetric, one scale per output channel: ``w[n, k] ~= q[n, k] * scale[n]``, q in [-127, 127].
* **int4**: group-wise along the input dimension (``group`` of 32, 64, 128 or 256 columns, default 32),
  a scale and an offset per group: ``w[n, k] ~= (q[n, k] - 8) * scale[n, g] + offset[n, g]``, q in
  [0, 15] (the offset is the value of the middle code 8: the asymmetric scheme of gpt-fast, whose
  ``scales_and_zeros`` PyTorch's kernels read as they are). 32 by default: the smallest group follows the
  weights most closely; a larger one stores fewer scales and offsets (smaller weights, coarser codes) and
  must divide every layer's input width.

On a CPU the matrix products run in integer kernels, never on a dequantized copy, for up to
``kernels.MAX_ROWS`` rows (a decode step). int8 layers take chatfactory's own (model/kernels.py, built on
first use: the activations quantized to int8 in blocks of 32 columns and each block an integer dot product,
as llama.cpp does), and for more rows (a prefill) one BLAS product on the weight dequantized for that call.
int4 layers take PyTorch's packed kernel, which runs them faster inside a decode step than ours (measured:
docs/small-hardware.md; ``set_kernels(model, True)`` takes ours for both): ``aten._weight_int4pack_mm_for_cpu``
on weights packed once by ``aten._convert_weight_to_int4pack_for_cpu``, and ``aten._weight_int8pack_mm`` for
int8 where ours do not fit (a width not a multiple of 32) or cannot be built (no C++ compiler). PyTorch's are
vectorised for bfloat16 activations only, so ``QuantLinear`` casts the activations, and reads int4 scales and
offsets, in ``QuantLinear.kernel_dtype`` (bfloat16). Set it to torch.float32 (``set_kernel_dtype``) for
products exact to fp32 round-off, at a lower speed.
Where no kernel fits (int4 with an output width not a multiple of 16, a group the kernel lacks, a GPU
tensor, a PyTorch without the op), the layer dequantizes its weight at each call (``layout == "plain"``).

Loading builds the GPT on the meta device and reads the stage one tensor at a time: a quantized stage
(or quantize on load) never holds an fp32 model. A GGUF's Q4_0/Q4_1 blocks become a quantized stage
with the file's own codes (formats/gguf.py: ``import_gguf(..., keep_quantized=True)``; layers differ in bits there:
``"layer_bits"``). A stage on disk is portable: ``model.safetensors`` holds raw quantized values, never a
kernel's layout — int8 ``qweight`` (N, K) with ``scales`` (N,); int4 ``qweight`` uint8 (N, K/2), two
codes per byte (low nibble = even column), ``scales`` and ``offsets`` (N, K/group) fp32 — and
``config.json`` the scheme under ``"quantized"`` (``{"scheme": "int4", "bits": 4, "group": 32,
"include_head": false}``; an fp32 GGUF import's ``"quantization"`` only names its source formats).

    chatfactory quantize --run runs/NAME --stage sft --bits 4 [--group 32] [--out-stage sft-int4]
    chatfactory chat --run runs/NAME --stage sft-int4              # a quantized stage loads as it is
    chatfactory sample --run runs/NAME --stage sft --quantize int8  # or on load (int4, int4:64; chat, eval, serve)

    from chatfactory.model.quant import quantize_model
    quantize_model(model, bits=4, group=32)        # in place; returns the model
    model, info = load_model("runs/NAME/sft-int4", inference=True)   # store/load.py: a quantized stage
"""

from __future__ import annotations

import contextlib
import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .gpt import GPT, GPTConfig

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes PyTorch's CPU int4 kernel takes
DEFAULT_GROUP = 32  # int4's default group (the module docstring says why; cli.py's --group default too)
# int4 scales/offsets held as bfloat16 (as in gpt-fast), the dtype the kernel reads (a GGUF's fp16 ones are rounded
# to it: their 8-bit mantissa against fp16's 11, a rounding far below the 4-bit codes' own)
INT4_SCALE_DTYPE = torch.bfloat16


def _has_op(name: str) -> bool:
    try:
        return hasattr(torch.ops.aten, name)
    except Exception:  # an op namespace that fails to resolve
        return False


HAS_INT8_KERNEL = _has_op("_weight_int8pack_mm")
HAS_INT4_KERNEL = _has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")


def parse_bits(spec) -> int:
    """4, 8, "4", "int4", "int8" -> 4 or 8; anything else a ValueError naming it."""
    s = str(spec).strip().lower()
    s = s[3:] if s.startswith("int") else s
    if s not in ("4", "8"):
        raise ValueError(f"quantization {spec!r}: only int8 (8 bits) and int4 (4 bits) are supported")
    return int(s)


def parse_spec(spec) -> tuple[int, int | None]:
    """``--quantize``'s value: "int8", "int4" or "int4:GROUP" -> (bits, group or None for the default)."""
    name, colon, group = str(spec).strip().lower().partition(":")
    bits = parse_bits(name)
    if not colon:
        return bits, None
    if bits != 4 or not group.isdigit() or int(group) not in INT4_GROUPS:
        raise ValueError(f"--quantize {spec}: a group size goes with int4 only, one of "
                         f"{', '.join(map(str, INT4_GROUPS))} (e.g. int4:32)")
    return bits, int(group)


# ---------------------------------------------------------------- the schemes
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q int8 (N, K), scales (N,) fp32 with w ~= q * scales[:, None]."""
    w = w.detach().float()
    scales = w.abs().amax(1).clamp(min=1e-10) / 127
    q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> q uint8 (N, K) in [0, 15], scales and offsets (N, K // group) fp32 holding bfloat16
    values, with w ~= (q - 8) * scale + offset on each group of ``group`` columns."""
    w = w.detach().float()
    N, K = w.shape
    wg = w.reshape(N, K // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo).clamp(min=1e-10) / 15).to(INT4_SCALE_DTYPE).float()
    offsets = (lo + 8 * scales).to(INT4_SCALE_DTYPE).float()
    q = ((wg - offsets[..., None]) / scales[..., None] + 8).round().clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), scales, offsets


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scales.to(dtype)[:, None]


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int,
                    dtype=torch.float32) -> torch.Tensor:
    N, K = q.shape
    qg = q.to(dtype).reshape(N, K // group, group)
    return ((qg - 8) * scales.to(dtype)[..., None] + offsets.to(dtype)[..., None]).reshape(N, K)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> uint8 (N, K / 2): column 2j in the low nibble, 2j + 1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], -1).reshape(p.size(0), -1)


def release_freed() -> None:
    """Freed heap back to the OS (glibc malloc_trim): the int4 kernel's packing frees buffers glibc would
    otherwise keep, so a quantized load's peak memory would vary from run to run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at a 64-byte boundary (a copy if it is not). PyTorch's int8 CPU kernel crashes on a
    weight that is not, and a tensor read straight out of a safetensors file is only 8-byte aligned."""
    return t if t.is_contiguous() and (t.is_meta or t.data_ptr() % 64 == 0) else t.contiguous().clone()


# ---------------------------------------------------------------- the layer
class QuantLinear(nn.Module):
    """A linear layer with int8 or int4 weights (see the module docstring for the schemes).

    Runtime buffers by ``layout``: "own" (model/kernels.py, chatfactory's kernels) and "plain" (dequantized at
    each call): int8 ``qweight`` (N, K) and ``scales`` (N,); int4 the portable nibble pairs ``qweight``
    (N, K/2) and ``scales_zeros``, (N, K/group, 2) for "own" and (K/group, N, 2) for "plain"; "cpu" (PyTorch's
    packed kernels): int4 ``qweight`` in that kernel's layout, ``scales_zeros`` (K/group, N, 2). ``state_dict``
    always holds the portable form, whatever the layout."""

    # activations inside the kernels: torch.float32 = exact products (the dequantized weight); otherwise the fast
    # path: int8 blocks of 32 in the own kernels, this dtype (bfloat16) in PyTorch's (the module docstring)
    kernel_dtype = torch.bfloat16
    # model/kernels.py's kernels where they fit and build: by default for int8 layers, which they run faster than
    # PyTorch's inside a decode step, and for int4 ones where their 512-bit path is built; elsewhere int4 layers
    # keep PyTorch's kernel, the faster one there (docs/small-hardware.md)
    use_own_kernels: bool | None = None  # None: the default by bits; True / False: ``set_kernels``

    def __init__(self, in_features: int, out_features: int, bits: int, group: int = DEFAULT_GROUP, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self.layout = "plain"
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(N))
        else:
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8))
            self.register_buffer("scales_zeros", torch.zeros(K // group, N, 2, dtype=INT4_SCALE_DTYPE))
        self.register_buffer("bias", torch.zeros(N) if bias else None)
        self._kernel_scales = None  # scales (int8) / scales_zeros (int4) in kernel_dtype, made once

    def extra_repr(self) -> str:
        g = f", group={self.group}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}{g}, layout={self.layout}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group: int = DEFAULT_GROUP) -> QuantLinear:
        return cls.from_weight(linear.weight, linear.bias, bits, group)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None, bits: int,
                    group: int = DEFAULT_GROUP) -> QuantLinear:
        """The layer quantizing the full-precision weight ``w`` (N, K) (and keeping ``bias`` in fp32)."""
        m = cls(w.size(1), w.size(0), bits, group, bias is not None)
        q, *scales = quantize_int8(w) if bits == 8 else quantize_int4(w, group)
        m.set_portable(q if bits == 8 else pack_nibbles(q), *scales)
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m.to(w.device)

    # -- the portable form (what is saved) <-> the runtime layout
    def set_portable(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None) -> None:
        # a layer built on the meta device (a model being loaded) takes the weights' device
        dev = qweight.device if self.qweight.is_meta else self.qweight.device
        if self.bits == 8:
            self.qweight, self.scales = _aligned(qweight.to(dev, torch.int8)), _aligned(scales.to(dev, torch.float32))
        else:
            self.qweight = qweight.to(dev, torch.uint8).contiguous()
            self.scales_zeros = torch.stack([scales.t(), offsets.t()], -1).to(dev, INT4_SCALE_DTYPE).contiguous()
        self.layout = "plain"
        self.relayout()

    def portable(self) -> dict:
        if self.bits == 8:
            return {"qweight": self.qweight, "scales": self.scales}
        q = pack_nibbles(self._unpack_kernel_layout()) if self.layout == "cpu" else self.qweight
        sz = self.scales_zeros if self.layout == "own" else self.scales_zeros.transpose(0, 1)  # (N, K/group, 2)
        return {"qweight": q, "scales": sz[..., 0].float().contiguous(), "offsets": sz[..., 1].float().contiguous()}

    def kernel_fits(self) -> bool:
        """Whether PyTorch's packed CPU kernel takes this layer."""
        if self.qweight.device.type != "cpu":
            return False  # the GPU kernels want other layouts (next step): dequantize on the fly there
        if self.bits == 8:
            return HAS_INT8_KERNEL
        return HAS_INT4_KERNEL and self.out_features % 16 == 0 and self.group in INT4_GROUPS

    def own_kernel_fits(self) -> bool:
        """Whether model/kernels.py's kernels take this layer (they are built on the first call that asks)."""
        K, own = self.in_features, self.use_own_kernels
        fits = (own is not False and self.qweight.device.type == "cpu"
                and K % kernels.BLOCK == 0 and K <= kernels.MAX_WIDTH
                and (self.bits == 8 or self.group % kernels.BLOCK == 0)
                and kernels.available())
        return fits and (own is True or self.bits == 8 or kernels.simd_bits() == 512)

    def relayout(self) -> None:
        """Take the layout of the best kernel that fits the layer and its device: own, PyTorch's, else plain."""
        want = "own" if self.own_kernel_fits() else "cpu" if self.kernel_fits() else "plain"
        if want != self.layout and self.bits == 4:
            p = self.portable()
            sz = torch.stack([p["scales"], p["offsets"]], -1).to(INT4_SCALE_DTYPE)  # (N, K/group, 2)
            if want == "cpu":
                codes = unpack_nibbles(p["qweight"]).to(torch.int32)
                self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            else:
                self.qweight = p["qweight"].contiguous()
            self.scales_zeros = (sz if want == "own" else sz.transpose(0, 1)).contiguous()
        self.layout = want
        self._kernel_scales = None
        if want == "cpu" and not self.qweight.is_meta:
            self._kernel_scales_for(self.kernel_dtype)  # made now: a compiled step reads them, never makes them

    def _kernel_scales_for(self, kd: torch.dtype) -> torch.Tensor:
        if self._kernel_scales is None or self._kernel_scales.dtype != kd:
            self._kernel_scales = _aligned((self.scales if self.bits == 8 else self.scales_zeros).to(kd))
        return self._kernel_scales

    def _unpack_kernel_layout(self) -> torch.Tensor:
        """The int4 codes (N, K) read back out of the CPU kernel's packed layout, by the kernel itself:
        the identity times the weight with scale 1 and offset 8 gives each code exactly (small
        integers are exact in bfloat16)."""
        K, N = self.in_features, self.out_features
        eye = torch.eye(K, dtype=torch.bfloat16)
        unit = torch.stack([torch.ones(K // self.group, N), torch.full((K // self.group, N), 8.0)], -1)
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight.cpu(), self.group, unit.to(torch.bfloat16))
        return codes.t().float().round().to(torch.uint8)

    def _apply(self, fn, recurse=True):
        # a move to another device goes through the plain layout (the CPU kernel's is CPU-only)
        if self.layout == "cpu" and self.bits == 4:
            probe = fn(torch.zeros(1, dtype=torch.uint8, device=self.qweight.device))
            if probe.device != self.qweight.device:
                self.layout = "plain"
                self.qweight = pack_nibbles(self._unpack_kernel_layout())
        out = super()._apply(fn, recurse)
        self.relayout()
        return out

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The full-precision weight (N, K) these codes stand for (the reference and the fallback)."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales, dtype)
        p = self.portable()
        return dequantize_int4(unpack_nibbles(p["qweight"]), p["scales"], p["offsets"], self.group, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.layout == "own" and x.device.type == "cpu":
            if self.kernel_dtype == torch.float32 or x2.size(0) > kernels.MAX_ROWS:  # exact: one BLAS product
                w = (kernels.int4_dequantize(self.qweight, self.scales_zeros, self.group) if self.bits == 4
                     else dequantize_int8(self.qweight, self.scales))
                y = F.linear(x2.float(), w)
            elif self.bits == 4:
                y = kernels.int4_matmul(x2.float().contiguous(), self.qweight, self.scales_zeros, self.group)
            else:
                y = kernels.int8_matmul(x2.float().contiguous(), self.qweight, self.scales)
            y = y.to(x.dtype)
        elif self.layout == "cpu" and x.device.type == "cpu":
            kd = self.kernel_dtype
            scales = self._kernel_scales_for(kd)
            if self.bits == 8:
                y = torch.ops.aten._weight_int8pack_mm(x2.to(kd).contiguous(), self.qweight, scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(kd).contiguous(), self.qweight, self.group, scales)
            y = y.to(x.dtype)
        else:  # no kernel for this layer or device: dequantize this layer's weight for this call only
            y = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape, self.out_features)

    # -- state_dict: the portable form only
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for k, v in self.portable().items():
            destination[prefix + k] = v if keep_vars else v.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = (["qweight", "scales"] + (["offsets"] if self.bits == 4 else [])
                 + (["bias"] if self.bias is not None else []))
        got = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        missing_keys.extend(prefix + n for n in names if n not in got)
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in names)
        if len(got) != len(names):
            return
        N, K = self.out_features, self.in_features
        want = {"qweight": (N, K) if self.bits == 8 else (N, K // 2),
                "scales": (N,) if self.bits == 8 else (N, K // self.group),
                "offsets": (N, K // self.group), "bias": (N,)}
        bad = [f"{prefix}{n} {tuple(t.shape)} (expected {want[n]})" for n, t in got.items()
               if tuple(t.shape) != want[n]]
        if bad:
            error_msgs.append("quantized weights of the wrong shape: " + ", ".join(bad))
            return
        with torch.no_grad():
            self.set_portable(got["qweight"], got["scales"], got.get("offsets"))
            if self.bias is not None:
                dev = got["bias"].device if self.bias.is_meta else self.bias.device
                self.bias = got["bias"].to(dev, torch.float32).clone()


# ---------------------------------------------------------------- the model
def _targets(model: GPT, include_head: bool):
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (include_head or name != "lm_head"):
            yield name, m


def check_scheme(model: GPT, bits: int, group: int, include_head: bool = False, layer_bits: dict | None = None) -> None:
    """ValueError naming what does not fit: bits other than 4 or 8, a group the int4 kernel lacks, a group
    that does not divide a layer's input width, a ``layer_bits`` entry naming no layer."""
    bits, layer_bits = parse_bits(bits), layer_bits or {}
    names = {name for name, _ in _targets(model, include_head)}
    if set(layer_bits) - names:
        raise ValueError(f"layer_bits names layers the model does not quantize: {sorted(set(layer_bits) - names)}")
    if 4 in [bits, *map(parse_bits, layer_bits.values())]:
        if group not in INT4_GROUPS:
            raise ValueError(f"--group {group}: int4 groups of {', '.join(map(str, INT4_GROUPS))} columns "
                             "are supported")
        for name, m in _targets(model, include_head):
            if parse_bits(layer_bits.get(name, bits)) == 4 and m.in_features % group:
                raise ValueError(f"--group {group} does not divide the input width {m.in_features} of {name}: "
                                 f"pick a group that divides every width (e.g. 32)")


def quantize_model(model: GPT, bits, group: int = DEFAULT_GROUP, include_head: bool = False, empty: bool = False,
                   layer_bits: dict | None = None, weights: dict | None = None) -> GPT:
    """Replace every linear of the blocks (and the LM head if ``include_head``) by a ``QuantLinear`` in place;
    returns the model. ``empty``: the layers' shapes only, for weights loaded next (``stage_model``).
    ``weights``: quantize each layer from its fp32 weight taken (popped) from this state dict instead of from
    the layer (a model built on the meta device: ``build_quantizing``). ``layer_bits``: {layer name: bits}
    where a layer differs from ``bits`` (a GGUF import's Q8_0 layers beside Q4 ones). A tied LM head
    quantized this way gets its own int copy; the embedding stays full precision."""
    bits = parse_bits(bits)
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is quantized already ({model.quantization['scheme']}): "
                         "quantize a full-precision one")
    check_scheme(model, bits, group, include_head, layer_bits)
    layer_bits = {k: parse_bits(v) for k, v in (layer_bits or {}).items() if parse_bits(v) != bits}
    for name, m in list(_targets(model, include_head)):
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        b = layer_bits.get(name, bits)
        if empty:
            q = QuantLinear(m.in_features, m.out_features, b, group, m.bias is not None).to(m.weight.device)
        elif weights is not None:
            q = QuantLinear.from_weight(*_take_linear(weights, name, model.cfg, m.bias is not None), b, group)
        else:
            q = QuantLinear.from_linear(m, b, group)
        setattr(owner, attr, q)
    model.quantization = scheme(bits, group, include_head, layer_bits)
    return model.eval()


def scheme(bits: int, group: int, include_head: bool, layer_bits: dict | None = None) -> dict:
    """The ``"quantized"`` entry of a stage's config.json (``layer_bits`` only where some layer differs)."""
    s = {"scheme": f"int{bits}", "bits": bits, "group": group if 4 in [bits, *(layer_bits or {}).values()] else None,
         "include_head": include_head}
    return {**s, "layer_bits": dict(layer_bits)} if layer_bits else s


def set_kernels(model: nn.Module, own: bool | None) -> None:
    """Whether every QuantLinear of ``model`` takes model/kernels.py's kernels (where they fit) or PyTorch's;
    None: the default (own for int8 layers; for int4 ones own where their 512-bit path is built, else PyTorch's)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.use_own_kernels = own
            m.relayout()


def set_kernel_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """The activations' dtype inside the CPU kernels of every QuantLinear of ``model``."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel_dtype = dtype
            if m.layout == "cpu":
                m._kernel_scales_for(dtype)


def linear_bytes(model: nn.Module) -> int:
    """Resident bytes of the linear layers' weights (+ scales/offsets; biases excluded), tied weights once."""
    seen, total = set(), 0
    for m in model.modules():
        ts = [m.weight] if isinstance(m, nn.Linear) else \
            [t for n, t in m.named_buffers(recurse=False) if n != "bias"] if isinstance(m, QuantLinear) else []
        for t in ts:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _take_linear(weights: dict, name: str, cfg: GPTConfig, bias: bool):
    """(weight, bias or None) of layer ``name`` from a state dict, popped (a tied head reads the embedding)."""
    release_freed()  # the previous layer's buffers
    tied = name == "lm_head" and cfg.tie_embeddings
    return (weights["tok_emb.weight"] if tied else weights.pop(name + ".weight"),
            weights.pop(name + ".bias") if bias else None)
