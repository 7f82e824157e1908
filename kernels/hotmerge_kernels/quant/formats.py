"""Weight-only quantization formats of a linear weight ``W (N out, K in)``, and ``quantize``.

Each format is a small dataclass of device tensors (packed codes and scales) that the kernels of
``linear`` read; ``reference.dequantize`` gives the weight back (the twins' and tests' oracle).

- ``nf4``: bitsandbytes' NF4, exactly: W flattened row-major, blocks of 64, ``absmax`` per block
  (float32), each value ``x / absmax`` (computed as ``x * (1 / absmax)``, clamped to [-1, 1]) to
  the nearest of the 16 NF4 code values (ties to the lower code), two codes per byte, the even
  element in the high nibble. Optional double quantization of the absmax as bitsandbytes does it
  (``compress_statistics``): ``absmax - mean`` blockwise-quantized with its signed 8-bit dynamic
  code, blocks of 256, a float32 absmax per block and the mean kept as ``offset``.
- ``int4``: asymmetric, groups of 128 along K (64 where K is not a multiple of 128, as in
  SmolLM2's 576-wide layers): per group ``scale = (max - min) / 15`` and an
  integer zero point, codes 0..15 packed two per byte like nf4 (even element high).
- ``int8``: symmetric, per output channel: ``scale = absmax / 127``, codes -127..127.
- ``fp8``: e4m3 (``float8_e4m3fn``), per output channel: ``scale = absmax / 448``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

import torch

FORMATS = ("nf4", "int4", "int8", "fp8")
NF4_BLOCK = 64
NF4_STATS_BLOCK = 256  # bitsandbytes' block for the double-quantized absmax
INT4_GROUP = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# bitsandbytes' NF4 code book (the normal-float 4-bit values, sorted; code i is value i).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclass
class QuantizedWeight:
    """What every format has: the original shape and dtype (what ``dequantize`` gives back)."""

    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def format(self) -> str:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        return [
            getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        ]

    @property
    def nbytes(self) -> int:
        """Device bytes of the packed codes and scales."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


@dataclass
class Nf4Weight(QuantizedWeight):
    packed: torch.Tensor  # (N, K // 2) uint8, even element in the high nibble
    absmax: torch.Tensor | None  # (N * K // 64,) float32; None when double-quantized
    # Double quantization (bitsandbytes' compress_statistics); all None without it.
    qabsmax: torch.Tensor | None = None  # (N * K // 64,) uint8 codes of absmax - offset
    absmax2: torch.Tensor | None = None  # (ceil(N * K / 64 / 256),) float32
    code2: torch.Tensor | None = None  # (256,) float32, bitsandbytes' signed dynamic code
    offset: torch.Tensor | None = None  # () float32, the mean of absmax

    @property
    def format(self) -> str:
        return "nf4"

    def block_scales(self) -> torch.Tensor:
        """Each 64-block's absmax in float32, decoded from the double quantization if any
        (as bitsandbytes' ``dequantize_4bit`` does: ``code2[q] * absmax2 + offset``)."""
        if self.absmax is not None:
            return self.absmax
        return _dequantize_blockwise(self.qabsmax, self.absmax2, self.code2) + self.offset


@dataclass
class Int4Weight(QuantizedWeight):
    packed: torch.Tensor  # (N, K // 2) uint8, even element in the high nibble, codes 0..15
    scale: torch.Tensor  # (N, K // group) float32
    zero: torch.Tensor  # (N, K // group) uint8, the code of 0.0

    @property
    def format(self) -> str:
        return "int4"

    @property
    def group(self) -> int:
        return self.shape[1] // self.scale.shape[1]


@dataclass
class Int8Weight(QuantizedWeight):
    qweight: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) float32

    @property
    def format(self) -> str:
        return "int8"


@dataclass
class Fp8Weight(QuantizedWeight):
    qweight: torch.Tensor  # (N, K) float8_e4m3fn
    scale: torch.Tensor  # (N,) float32

    @property
    def format(self) -> str:
        return "fp8"


# -- codes ------------------------------------------------------------------------------------


@functools.cache
def _nf4_code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def nf4_code(device: torch.device | str) -> torch.Tensor:
    return _nf4_code(torch.device(device))


@functools.cache
def _dynamic_code(device: torch.device) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map(signed=True)``): for each
    exponent e = 0..6, the midpoints of ``2**e + 1`` points linearly spaced on [0.1, 1], times
    ``10**(e - 6)``, both signs; then 0 and 1; 256 values, sorted."""
    values: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (e - 6) * means).tolist()  # float32 products, as bitsandbytes has them
        values += (-(10 ** (e - 6)) * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(values, dtype=torch.float32).sort().values.to(device)


def dynamic_code(device: torch.device | str) -> torch.Tensor:
    return _dynamic_code(torch.device(device))


def _blockwise_absmax(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block (float32), the values scaled to [-1, 1]) as bitsandbytes computes
    them: ``clamp(x * (1 / absmax), -1, 1)``, a partial last block on its own."""
    n = flat.numel()
    pad = -n % block
    padded = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    absmax = padded.abs().amax(dim=1)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = torch.clamp(padded * inv[:, None], -1, 1).reshape(-1)[:n]
    return absmax, scaled


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` (at a midpoint: the lower one)."""
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)


def _dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor):
    block = NF4_STATS_BLOCK
    values = code[q.long()]
    pad = -values.numel() % block
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, block) * absmax[:, None]
    return values.reshape(-1)[: q.numel()]


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K // 2) bytes, the even element in the high nibble."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) bytes -> (N, K) codes (uint8)."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).view(packed.shape[0], -1)


# -- quantize ----------------------------------------------------------------------------------


def _over(x: torch.Tensor, d: float) -> torch.Tensor:
    """``x / d`` correctly rounded on every device: CUDA divides a tensor by a Python number as
    ``x * (1 / d)``, a last-bit difference from the CPU that can move a code."""
    return x / torch.tensor(d, dtype=x.dtype, device=x.device)


def _check(weight: torch.Tensor, multiple: int, fmt: str) -> tuple[int, int]:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{fmt}: expected a 2-D floating weight, got {tuple(weight.shape)}")
    n, k = weight.shape
    if k % multiple:
        raise ValueError(f"{fmt}: in_features {k} is not a multiple of {multiple}")
    return n, k


def quantize_nf4(weight: torch.Tensor, double_quant: bool = False) -> Nf4Weight:
    n, k = _check(weight, NF4_BLOCK, "nf4")
    absmax, scaled = _blockwise_absmax(weight.reshape(-1).float(), NF4_BLOCK)
    codes = _nearest(scaled, nf4_code(weight.device)).view(n, k)
    packed = _pack_nibbles(codes)
    out = Nf4Weight((n, k), weight.dtype, packed=packed, absmax=absmax)
    if double_quant:
        offset = absmax.mean()
        code2 = dynamic_code(weight.device)
        absmax2, scaled2 = _blockwise_absmax(absmax - offset, NF4_STATS_BLOCK)
        out.absmax = None
        out.qabsmax = _nearest(scaled2, code2)
        out.absmax2, out.code2, out.offset = absmax2, code2, offset
    return out


def int4_group(k: int) -> int:
    """The int4 group along K: 128, or 64 where K is not a multiple of 128."""
    return INT4_GROUP if k % INT4_GROUP == 0 else INT4_GROUP // 2


def quantize_int4(weight: torch.Tensor, group: int | None = None) -> Int4Weight:
    group = group or int4_group(weight.shape[-1])
    n, k = _check(weight, group, "int4")
    w = weight.float().view(n, k // group, group)
    lo = w.amin(dim=-1).clamp(max=0)  # the range always holds 0, so 0 has an exact code
    hi = w.amax(dim=-1).clamp(min=0)
    scale = _over(hi - lo, 15).clamp(min=1e-10)
    zero = torch.round(-lo / scale).clamp(0, 15)
    codes = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, 15)
    packed = _pack_nibbles(codes.to(torch.uint8).view(n, k))
    return Int4Weight((n, k), weight.dtype, packed=packed, scale=scale, zero=zero.to(torch.uint8))


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    n, k = _check(weight, 1, "int8")
    w = weight.float()
    scale = _over(w.abs().amax(dim=1), 127).clamp(min=1e-10)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return Int8Weight((n, k), weight.dtype, qweight=q, scale=scale)


def quantize_fp8(weight: torch.Tensor) -> Fp8Weight:
    n, k = _check(weight, 1, "fp8")
    w = weight.float()
    scale = _over(w.abs().amax(dim=1), FP8_MAX).clamp(min=1e-12)
    q = torch.clamp(w / scale[:, None], -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight((n, k), weight.dtype, qweight=q, scale=scale)


def stack_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights of one format and K stacked along N (q/k/v, gate/up as the forward fuses them);
    nf4 and int8 (what checkpoints saved quantized hold). A 64-block of NF4 never leaves its
    row, so codes and absmax concatenate; double-quantized absmax are decoded first (exactly as
    ``block_scales``: their offsets and blocks of 256 are each weight's own). int8's codes and
    per-row scales concatenate. A single weight is returned as it is."""
    if len(weights) == 1:
        return weights[0]
    first = weights[0]
    if len({(type(w), w.shape[1]) for w in weights}) != 1:
        parts = [(w.format, w.shape) for w in weights]
        raise ValueError(f"stack_rows: formats or in_features differ: {parts}")
    shape = (sum(w.shape[0] for w in weights), first.shape[1])
    if isinstance(first, Nf4Weight):
        packed, absmax = torch.cat([w.packed for w in weights]), [w.block_scales() for w in weights]
        return Nf4Weight(shape, first.dtype, packed=packed, absmax=torch.cat(absmax))
    if isinstance(first, Int8Weight):
        qweight = torch.cat([w.qweight for w in weights])
        return Int8Weight(shape, first.dtype, qweight, torch.cat([w.scale for w in weights]))
    raise ValueError(f"stack_rows: {first.format} weights are not stacked")


_QUANTIZE = {"nf4": quantize_nf4, "int4": quantize_int4, "int8": quantize_int8, "fp8": quantize_fp8}


def quantize(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """``weight (N, K)`` in format ``fmt`` (one of ``FORMATS``)."""
    try:
        fn = _QUANTIZE[fmt]
    except KeyError:
        raise ValueError(f"quantize: unknown format {fmt!r}; use one of {FORMATS}") from None
    with torch.no_grad():
        return fn(weight)


__all__ = [
    "FORMATS",
    "Fp8Weight",
    "Int4Weight",
    "Int8Weight",
    "Nf4Weight",
    "QuantizedWeight",
    "dynamic_code",
    "int4_group",
    "nf4_code",
    "quantize",
    "stack_rows",
    "unpack_nibbles",
]
