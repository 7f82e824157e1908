"""One flat device buffer per adapter, with a segment table.

Every LoRA tensor of an adapter lives in one contiguous 1-D buffer (one dtype), so that a merge
runs over whole adapters in a handful of kernel launches however many layers the model has.
A segment names one tensor: the module it belongs to (its path in the base model, e.g.
``model.layers.0.self_attn.q_proj``), which half (``A``: ``(r, in_features)``, ``B``:
``(out_features, r)``), and where it sits in the buffer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from math import prod
from typing import Literal

import torch

Part = Literal["A", "B"]


@dataclass(frozen=True)
class Segment:
    module: str
    part: Part
    offset: int  # in elements, into FlatAdapter.buffer
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(eq=False)
class FlatAdapter:
    """A LoRA adapter as one buffer plus its segment table.

    ``scaling`` is what the layer multiplies ``x·Aᵀ·Bᵀ`` by (alpha/r, rsLoRA alpha/sqrt(r));
    a merged adapter has its weights folded in and scaling 1.
    """

    buffer: torch.Tensor
    segments: tuple[Segment, ...]
    rank: int
    scaling: float
    # Per-adapter caches that depend only on the adapter's contents (e.g. trim thresholds
    # by density); cleared with the adapter.
    cache: dict = field(default_factory=dict, repr=False)
    # Set when the buffer was written on another CUDA stream (a merge's): readers on other
    # streams wait on it before first use.
    ready_event: torch.cuda.Event | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.buffer.dim() != 1 or not self.buffer.is_contiguous():
            raise ValueError("FlatAdapter.buffer must be a contiguous 1-D tensor")
        self._index = {(s.module, s.part): s for s in self.segments}

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[tuple[str, Part], torch.Tensor],
        *,
        rank: int,
        scaling: float,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> FlatAdapter:
        """Pack ``{(module, part): tensor}`` into one buffer: A then B per module, sorted."""
        modules = sorted({m for m, _ in tensors})
        segments: list[Segment] = []
        offset = 0
        for module in modules:
            for part in ("A", "B"):
                t = tensors.get((module, part))
                if t is None or t.dim() != 2:
                    raise ValueError(f"module {module!r} needs a 2-D lora_{part} tensor")
                segments.append(Segment(module, part, offset, tuple(t.shape)))
                offset += t.numel()
        first = next(iter(tensors.values()))
        dtype = dtype or first.dtype
        device = device if device is not None else first.device
        buffer = torch.empty(offset, dtype=dtype, device=device)
        for seg in segments:
            src = tensors[(seg.module, seg.part)]
            buffer[seg.offset : seg.offset + seg.numel].copy_(src.reshape(-1))
        return cls(buffer=buffer, segments=tuple(segments), rank=rank, scaling=scaling)

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(s.module for s in self.segments))

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def segment(self, module: str, part: Part) -> Segment | None:
        return self._index.get((module, part))

    def tensor(self, module: str, part: Part) -> torch.Tensor:
        """A view of one LoRA tensor (no copy)."""
        seg = self._index[(module, part)]
        return self.buffer[seg.offset : seg.offset + seg.numel].view(seg.shape)

    def items(self) -> Iterable[tuple[Segment, torch.Tensor]]:
        for seg in self.segments:
            yield seg, self.buffer[seg.offset : seg.offset + seg.numel].view(seg.shape)
