"""LoRA on a base nn.Linear, with a different adapter (or none) for each row of the batch.

Every wrapped layer reads the same :class:`AdapterSlots` object, which the model runner fills
before each forward: one slot per batch row, holding a FlatAdapter or None (the base model).

One adapter for the whole batch: ``y = base(x) + scaling · (x · Aᵀ) · Bᵀ``.

Several adapters: the distinct adapters' A are concatenated along the rank (``A_cat``, B
likewise) and a per-row mask keeps each row's own rank columns, scaled:

    y = base(x) + ((x · A_catᵀ) ⊙ M) · B_catᵀ,   M[row, cols of g] = scaling_g if row uses g

so a layer costs the same few launches however many adapters the batch mixes (a loop over
adapter groups costs ~5 launches per group per layer, which dominated decode steps). Each layer
keeps its concatenation, and a small table of each adapter's scaled columns, for the SET of
adapters in the batch (a copy of them, one adapter's bytes each): rows joining, finishing or
moving between prefill and decode only change the per-row index into that table, computed once
per forward for all layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from hotmerge_kernels.layout import FlatAdapter
from torch import nn


@dataclass
class AdapterSlots:
    """The per-row adapters of the current forward, shared by all LoraLinear layers."""

    groups: list[tuple[FlatAdapter, torch.Tensor | None]] = field(default_factory=list)
    # (adapter, row indices); indices None when the adapter covers every row of the batch.
    rows: list[FlatAdapter | None] = field(default_factory=list)  # each row's adapter
    # The batch's distinct adapters (ordered by id: a stable key for the set) and, per row, the
    # index of its adapter in it (len(mixed) for the base model): the mixed path's inputs.
    mixed: tuple[FlatAdapter, ...] = ()
    row_index: torch.Tensor | None = None

    # The last grouping, reused while the batch keeps its rows (every decode step): it holds
    # the adapters, so their ids cannot be reused by other objects meanwhile.
    _last: tuple[tuple[int, ...], list] = field(default=((), []), repr=False)

    def set(self, slots: Sequence[FlatAdapter | None], device: torch.device | str) -> None:
        key = tuple(id(a) for a in slots)
        if key == self._last[0]:
            self.groups = self._last[1]
            return
        self.rows = list(slots)
        self.mixed = tuple(sorted({id(a): a for a in slots if a is not None}.values(), key=id))
        position = {id(a): i for i, a in enumerate(self.mixed)}
        self.row_index = torch.tensor(
            [len(self.mixed) if a is None else position[id(a)] for a in slots], device=device
        )
        rows_by_adapter: dict[int, tuple[FlatAdapter, list[int]]] = {}
        for row, adapter in enumerate(slots):
            if adapter is not None:
                rows_by_adapter.setdefault(id(adapter), (adapter, []))[1].append(row)
        self.groups = []
        for adapter, rows in rows_by_adapter.values():
            if len(rows) == len(slots):
                self.groups.append((adapter, None))
            else:
                self.groups.append((adapter, torch.tensor(rows, device=device)))
        self._last = (key, self.groups)

    def clear(self) -> None:
        self.groups = []

    def reset(self) -> None:
        """Drop every reference to adapters, the reused grouping too (the batch is empty)."""
        self.groups, self.rows, self.mixed, self.row_index = [], [], (), None
        self._last = ((), [])


class LoraLinear(nn.Module):
    """A base nn.Linear plus the LoRA delta of each row's adapter slot."""

    def __init__(self, base: nn.Linear, module_path: str, slots: AdapterSlots) -> None:
        super().__init__()
        self.base = base
        self.module_path = module_path  # the key of this layer's tensors in a FlatAdapter
        self.slots = slots
        # (adapters, A_cat, B_cat, column table) for the set of adapters last seen; holding
        # the adapters keeps their ids from being reused while they key this cache.
        self._mixed: tuple | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        groups = self.slots.groups
        if len(groups) > 1 and x.dim() == 3 and x.shape[0] == len(self.slots.rows):
            mixed = self._mixed_tensors(x)
            if mixed is None:  # no adapter in the batch touches this layer
                return y
            a_cat, b_cat, columns = mixed
            mask = columns[self.slots.row_index].unsqueeze(1)  # (batch, 1, total rank)
            return y + ((x @ a_cat.T) * mask) @ b_cat.T
        for adapter, rows in groups:
            if adapter.segment(self.module_path, "A") is None:
                continue  # this adapter does not touch this layer
            a = adapter.tensor(self.module_path, "A")  # (r, in)
            b = adapter.tensor(self.module_path, "B")  # (out, r)
            if a.dtype != x.dtype:  # e.g. a merged adapter kept in float32
                a, b = a.to(x.dtype), b.to(x.dtype)
            if rows is None:
                y = y + adapter.scaling * ((x @ a.T) @ b.T)
            else:
                delta = adapter.scaling * ((x[rows] @ a.T) @ b.T)
                y = y.index_add(0, rows, delta.to(y.dtype))
        return y

    def _mixed_tensors(self, x: torch.Tensor):
        """A_cat, B_cat and the column table of the batch's adapter set (cached per set).

        Row i of the table holds adapter i's scaling on its own rank columns, zeros elsewhere;
        the last row (the base model) is all zeros.
        """
        adapters = self.slots.mixed
        cached = self._mixed
        same_set = (
            cached is not None
            and len(cached[0]) == len(adapters)
            and all(a is b for a, b in zip(cached[0], adapters, strict=True))
        )
        if same_set:
            return None if cached[1] is None else cached[1:]
        a_parts, b_parts, spans = [], [], []
        width = 0
        for adapter in adapters:
            if adapter.segment(self.module_path, "A") is None:
                spans.append(None)
                continue
            a = adapter.tensor(self.module_path, "A")
            spans.append((width, width + a.shape[0], adapter.scaling))
            width += a.shape[0]
            a_parts.append(a.to(x.dtype))
            b_parts.append(adapter.tensor(self.module_path, "B").to(x.dtype))
        if not a_parts:
            self._mixed = (adapters, None, None, None)
            return None
        columns = torch.zeros(len(adapters) + 1, width)
        for i, span in enumerate(spans):
            if span is not None:
                start, end, scaling = span
                columns[i, start:end] = scaling
        mixed = (torch.cat(a_parts), torch.cat(b_parts, dim=1), columns.to(x.device, x.dtype))
        self._mixed = (adapters, *mixed)
        return mixed

    def extra_repr(self) -> str:
        return f"module_path={self.module_path!r}"


def wrap_linears(
    model: nn.Module, target_modules: Sequence[str] | None, slots: AdapterSlots
) -> dict[str, LoraLinear]:
    """Replace target nn.Linear layers of ``model`` by LoraLinear, in place.

    ``target_modules``: last name components to wrap (``q_proj``, ...); None wraps every
    nn.Linear except the output embedding (lm_head), which LoRA serving does not target.
    Returns ``{module_path: LoraLinear}``.
    """
    output_embedding = getattr(model, "get_output_embeddings", lambda: None)()
    targets = set(target_modules) if target_modules is not None else None
    chosen = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output_embedding:
            continue
        if targets is not None and path.rsplit(".", 1)[-1] not in targets:
            continue
        chosen.append((path, module))
    wrapped = {}
    for path, linear in chosen:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = LoraLinear(linear, path, slots)
        setattr(parent, name, layer)
        wrapped[path] = layer
    return wrapped
