"""The one Triton-or-torch switch: ``hotmerge_kernels.backend``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hotmerge_kernels import backend

ON_CUDA = SimpleNamespace(is_cuda=True)  # stands in for a CUDA tensor (only is_cuda is read)


def test_triton_on_cuda_torch_elsewhere(monkeypatch):
    monkeypatch.setattr(backend, "TRITON_ENABLED", True)
    assert backend.use_triton(ON_CUDA)
    assert not backend.use_triton(torch.zeros(2))
    assert backend.resolve_backend("auto", ON_CUDA) == "triton"
    assert backend.resolve_backend("auto", torch.zeros(2)) == "torch"


def test_hotmerge_triton_0_picks_the_twins_on_cuda(monkeypatch):
    monkeypatch.setattr(backend, "TRITON_ENABLED", False)
    assert not backend.use_triton(ON_CUDA)
    assert backend.resolve_backend("auto", ON_CUDA) == "torch"


def test_an_explicit_backend_is_kept_and_an_unknown_one_refused():
    assert backend.resolve_backend("triton", torch.zeros(2)) == "triton"
    assert backend.resolve_backend("torch", ON_CUDA) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.resolve_backend("cuda", torch.zeros(2))
