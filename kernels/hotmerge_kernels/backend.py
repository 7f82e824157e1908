"""Triton or torch: which engine runs a kernel, decided here and nowhere else.

Every Triton entry point has a torch twin of the same name and signature in its package's
``reference`` module. ``use_triton(x)`` says which runs on ``x``: the Triton kernels on CUDA
tensors, the twins everywhere else, and the twins everywhere with ``HOTMERGE_TRITON=0`` (to
compare the two paths on one GPU). Both domains ask it: ``merge_adapters`` and
``trim_thresholds`` with ``backend="auto"`` (``resolve_backend``), and the server's forward
operators (``hotmerge/engine/ops.py``). Tests and benchmarks name an engine instead:
``backend="torch"`` or ``"triton"`` for merges (Triton also runs on CPU tensors under
``TRITON_INTERPRET=1``), or the twin itself for the ops.

The kernels' environment, read once at import (these values sit on every launch's path):

- ``HOTMERGE_TRITON`` (default 1): 0 runs the torch twins on every device.
- ``HOTMERGE_PDL`` (default 1): 0 launches the step's kernels without programmatic dependent
  launch (``ops/pdl.py``).
- ``HOTMERGE_FP8_MATMUL`` (default ``weight_only``): ``scaled_mm`` runs fp8 base weights
  through ``torch._scaled_mm`` (W8A8, the activations quantized per row; ``quant/linear.py``).
- ``TRITON_INTERPRET`` (Triton's own): 1 runs kernels in Triton's interpreter (CPU tensors; the
  tests); no PDL then, and the LoRA kernels take small tiles.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

TRITON_ENABLED = os.environ.get("HOTMERGE_TRITON", "1") != "0"
PDL_ENABLED = os.environ.get("HOTMERGE_PDL", "1") != "0"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
FP8_MATMULS = ("weight_only", "scaled_mm")
FP8_MATMUL = os.environ.get("HOTMERGE_FP8_MATMUL", "weight_only")
if FP8_MATMUL not in FP8_MATMULS:
    raise ValueError(f"HOTMERGE_FP8_MATMUL must be one of {FP8_MATMULS}, got {FP8_MATMUL!r}")

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")


def use_triton(x: torch.Tensor) -> bool:
    """Whether kernels on ``x`` run as Triton (else as their torch twins). Takes the tensor,
    not its device: ``x.is_cuda`` costs a tenth of ``x.device``, and the forward asks per op."""
    return TRITON_ENABLED and x.is_cuda


def resolve_backend(backend: str, x: torch.Tensor) -> Literal["torch", "triton"]:
    """The engine a call that asked for ``backend`` runs on ``x``: ``"auto"`` asks ``use_triton``;
    ``"torch"`` and ``"triton"`` are taken as they are."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if use_triton(x) else "torch"
    return backend
