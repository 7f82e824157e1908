"""Quantized base weights: the formats (nf4, int4, int8, fp8) and ``quantize`` (``formats``),
the Triton ``qlinear`` and ``dequantize`` (``linear``) and their torch twins (``reference``)."""

from hotmerge_kernels.quant.formats import (
    FORMATS,
    Fp8Weight,
    Int4Weight,
    Int8Weight,
    Nf4Weight,
    QuantizedWeight,
    quantize,
)

__all__ = [
    "FORMATS",
    "Fp8Weight",
    "Int4Weight",
    "Int8Weight",
    "Nf4Weight",
    "QuantizedWeight",
    "quantize",
]
