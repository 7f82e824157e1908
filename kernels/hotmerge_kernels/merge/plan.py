"""Where each output element of a merge comes from: the tables both merge engines read.

A plan depends only on the segment tables of the adapters being merged (not on their contents,
weights or strategy), so it is built once per combination of layouts and cached. Every table is
indexed by output segment ``j`` (and adapter ``i``); ``in_off[j, i] == -1`` marks an adapter that
lacks the module, which the engines read as an all-zero tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hotmerge_kernels.layout import FlatAdapter, Segment
from hotmerge_kernels.lru import LockedLRU


@dataclass(eq=False)
class MergePlan:
    segments: tuple[Segment, ...]  # of the output, A then B per module, modules sorted
    rank: int
    total: int  # elements in the output buffer
    seg_out_off: torch.Tensor  # int64 [S]
    seg_numel: torch.Tensor  # int64 [S]
    seg_is_b: torch.Tensor  # int64 [S], 0 for A, 1 for B
    in_off: torch.Tensor  # int64 [S, N], offset of the input tensor in adapter i's buffer, or -1
    in_seg: torch.Tensor  # int64 [S, N], index of that tensor in adapter i's segments, or -1
    # cat only, one column per (output tensor, input that has it): input, src offset, numel,
    # dst offset, width, stride; element e lands at dst + (e // width) * stride + e % width.
    copies: torch.Tensor | None = None  # int64 [7, C], last row: 1 for B tensors
    has_gaps: bool = False  # cat: some module lacks some adapters, so part of it is zero
    aligned: bool = False  # every output numel and input offset is a multiple of 16 elements
    _chunks: dict = field(default_factory=dict)
    _template: FlatAdapter | None = None

    def merged_adapter(self, buffer: torch.Tensor) -> FlatAdapter:
        """The merged adapter around ``buffer``: a shallow copy of one built once, so that each
        merge skips rebuilding the segment index (hundreds of entries)."""
        if self._template is None:
            empty = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
            self._template = FlatAdapter(empty, self.segments, rank=self.rank, scaling=1.0)
        merged = object.__new__(FlatAdapter)  # copy.copy costs ~4x more (__reduce_ex__)
        merged.__dict__.update(self._template.__dict__)
        merged.buffer = buffer
        merged.cache = {}
        return merged

    def chunks(self, block: int, *, copies: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment, start) of every ``block``-element chunk of every output segment (int32);
        with ``copies``, (copy, start) over the cat copies instead."""
        if (block, copies) not in self._chunks:
            numel = (self.copies[2] if copies else self.seg_numel).cpu()
            per_seg = (numel + block - 1) // block
            seg = torch.repeat_interleave(torch.arange(len(numel)), per_seg)
            first = torch.cumsum(per_seg, 0) - per_seg
            start = (torch.arange(len(seg)) - first[seg]) * block
            device = self.seg_numel.device
            self._chunks[(block, copies)] = (
                seg.to(torch.int32).to(device),
                start.to(torch.int32).to(device),
            )
        return self._chunks[(block, copies)]


def layout_signature(adapter: FlatAdapter) -> str:
    """A digest of the adapter's segment table, computed once and kept in its cache."""
    sig = adapter.cache.get("layout_signature")
    if sig is None:
        sig = hashlib.blake2b(repr(adapter.segments).encode(), digest_size=16).hexdigest()
        adapter.cache["layout_signature"] = sig
    return sig


_PLANS: LockedLRU[MergePlan] = LockedLRU(32)  # by the inputs' layouts, cat or not, device


def get_plan(adapters: Sequence[FlatAdapter], *, cat: bool) -> MergePlan:
    """The plan of merging these adapters' layouts, built once per combination and kept."""
    key = (tuple(layout_signature(a) for a in adapters), cat, str(adapters[0].device))
    return _PLANS.get(key, lambda: build_plan(adapters, cat=cat))


def build_plan(adapters: Sequence[FlatAdapter], *, cat: bool) -> MergePlan:
    """Union of the adapters' modules; raises ValueError on shapes that cannot merge."""
    index = [{(s.module, s.part): k for k, s in enumerate(a.segments)} for a in adapters]
    modules = sorted({m for a in adapters for m in a.modules})
    total_rank = sum(a.rank for a in adapters)
    n = len(adapters)
    segments, rows, copies = [], [], []
    offset = 0
    has_gaps = False
    for module in modules:
        present = [i for i in range(n) if (module, "A") in index[i]]
        if any((module, "B") not in index[i] for i in present):
            raise ValueError(f"module {module!r} lacks lora_B in an adapter that has lora_A")
        for part in ("A", "B"):
            shapes = [adapters[i].segments[index[i][(module, part)]].shape for i in present]
            if cat:
                keep = 1 if part == "A" else 0  # in_features of A, out_features of B
                if len({s[keep] for s in shapes}) != 1:
                    raise ValueError(f"lora_{part} of {module!r} has different shapes: {shapes}")
                shape = (total_rank, shapes[0][1]) if part == "A" else (shapes[0][0], total_rank)
            else:
                if len(set(shapes)) != 1:
                    raise ValueError(f"lora_{part} of {module!r} has different shapes: {shapes}")
                shape = shapes[0]
            seg = Segment(module, part, offset, shape)
            segments.append(seg)
            offset += seg.numel
            row = {"in_off": [-1] * n, "in_seg": [-1] * n}
            lo = 0  # PEFT packs the present adapters' ranks first, zeros after
            has_gaps |= cat and len(present) < n
            for i in present:
                k = index[i][(module, part)]
                src = adapters[i].segments[k]
                row["in_off"][i], row["in_seg"][i] = src.offset, k
                r = src.shape[0] if part == "A" else src.shape[1]
                if part == "A":
                    dst, width, stride = seg.offset + lo * shape[1], shape[1], shape[1]
                else:
                    dst, width, stride = seg.offset + lo, r, shape[1]
                copies.append([i, src.offset, src.numel, dst, width, stride, int(part == "B")])
                lo += r
            rows.append(row)

    device = adapters[0].device

    def table(key: str) -> torch.Tensor:
        return torch.tensor([r[key] for r in rows], dtype=torch.int64).reshape(-1, n).to(device)

    def column(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    plan = MergePlan(
        segments=tuple(segments),
        rank=total_rank if cat else adapters[0].rank,
        total=offset,
        seg_out_off=column([s.offset for s in segments]),
        seg_numel=column([s.numel for s in segments]),
        seg_is_b=column([int(s.part == "B") for s in segments]),
        in_off=table("in_off"),
        in_seg=table("in_seg"),
        aligned=all(s.numel % 16 == 0 for s in segments)
        and all(o % 16 == 0 for r in rows for o in r["in_off"] if o >= 0),
    )
    if cat:
        plan.copies = torch.tensor(copies, dtype=torch.int64).reshape(-1, 7).T.contiguous()
        plan.copies = plan.copies.to(device)
        plan.has_gaps = has_gaps
    return plan
