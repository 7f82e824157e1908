"""Quantized base weights: formats (nf4, int4, int8, fp8), their torch twins and ``qlinear``."""

from hotmerge_kernels.quant.formats import (
    FORMATS,
    Fp8Weight,
    Int4Weight,
    Int8Weight,
    Nf4Weight,
    QuantizedWeight,
    dequantize,
    quantize,
)
from hotmerge_kernels.quant.linear import qlinear, qlinear_torch, qlinear_triton

__all__ = [
    "FORMATS",
    "Fp8Weight",
    "Int4Weight",
    "Int8Weight",
    "Nf4Weight",
    "QuantizedWeight",
    "dequantize",
    "qlinear",
    "qlinear_torch",
    "qlinear_triton",
    "quantize",
]
