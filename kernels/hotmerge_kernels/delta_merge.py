"""ΔW-space merges (PEFT's ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
``magnitude_prune_svd``): the contract is in ``merge.py``'s docstring.

Module by module: each adapter's ΔWᵢ = sᵢ·Bᵢ·Aᵢ (float32) is written into a workspace reused for
every module (so the engines' address tables stay the same and memory is bounded by the largest
module), the element-wise engine (the same kernels, trim thresholds, sign election and Philox
stream as factor-space merges) combines the ΔWᵢ into a merged ΔW, and ``low_rank`` factorises
it to rank r: a randomized range finder (oversampling, power iterations) for large modules, an
exact SVD for small ones.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from . import reference
from .layout import FlatAdapter, Segment
from .params import MergeParams, SignMethod, Strategy
from .plan import MergePlan, lru_get

OVERSAMPLE = 16  # extra columns of the range finder (issue 11: rank + 16, 4 power iterations)
POWER_ITERS = 4
EXACT_FACTOR = 4  # exact SVD when min(out, in) <= EXACT_FACTOR * (rank + OVERSAMPLE)

Progress = Callable[[int, int, str], None]  # (modules done, modules in all, module)
_plans: OrderedDict[tuple, MergePlan] = OrderedDict()


def merged_rank(adapters: Sequence[FlatAdapter], params: MergeParams) -> int:
    """PEFT's new rank of a ΔW-space merge: ``svd_rank``, else the largest input rank."""
    return params.svd_rank or max(a.rank for a in adapters)


def delta_merge(
    adapters: Sequence[FlatAdapter],
    params: MergeParams,
    engine,
    *,
    progress: Progress | None = None,
) -> FlatAdapter:
    """The merged adapter (rank ``merged_rank``, scaling 1, the inputs' dtype) of a ΔW-space
    strategy; ``engine`` is ``reference`` or ``triton_merge`` for the element-wise step."""
    adapters = list(adapters)
    rank = merged_rank(adapters, params)
    layout = _output_layout(adapters, rank)
    out = torch.empty(
        sum(s.numel for s in layout), dtype=adapters[0].dtype, device=adapters[0].device
    )
    merged = FlatAdapter(out, layout, rank=rank, scaling=1.0)
    modules = merged.modules
    shapes = {m: _delta_shape(adapters, m) for m in modules}
    largest = max((n_out * n_in for n_out, n_in in shapes.values()), default=1)
    n = len(adapters)
    work = torch.empty(n + 1, largest, dtype=torch.float32, device=out.device)
    mode, elect = _mode(params)
    weights = torch.tensor([params.weights, params.weights], dtype=torch.float32)
    thresholds = (
        _threshold_vectors(adapters, params.density) if mode == reference.MODE_TRIM else None
    )
    for done, module in enumerate(modules):
        n_out, n_in = shapes[module]
        numel = n_out * n_in
        present = []
        for i, a in enumerate(adapters):
            if a.segment(module, "A") is not None:
                delta = work[i, :numel].view(n_out, n_in)
                torch.matmul(
                    a.tensor(module, "B").float(), a.tensor(module, "A").float(), out=delta
                )
                delta.mul_(a.scaling)
                present.append(i)
        plan = _module_plan(adapters, module, (n_out, n_in))
        buffers = [work[i, :numel] for i in range(n)]
        if thresholds is not None:
            _fill_thresholds(adapters, module, buffers, present, params.density, thresholds, engine)
        result = work[n, :numel]
        engine.elementwise_merge(
            result, plan, buffers, weights, per_segment=False,
            thresholds=[t for t, _ in thresholds] if thresholds is not None else None,
            mode=mode, elect=elect, density=params.density, seed=params.seed,
        )  # fmt: skip
        lora_a, lora_b = factors(result.view(n_out, n_in), rank, params.svd_clamp)
        merged.tensor(module, "A").copy_(lora_a)
        merged.tensor(module, "B").copy_(lora_b)
        if progress is not None:
            progress(done + 1, len(modules), module)
    return merged


def factors(
    delta: torch.Tensor, rank: int, clamp: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) with B·A the rank-``rank`` truncation of ``delta``, as
    PEFT: B = U·S, A = Vᴴ, then both clamped to ±quantile(B ∪ A, clamp). Zero-padded where
    ``rank`` exceeds min(out, in)."""
    u, s, vh = low_rank(delta, rank)
    lora_b = u * s
    lora_a = vh
    if clamp is not None:
        hi = torch.quantile(torch.cat([lora_b.flatten(), lora_a.flatten()]), clamp)
        lora_b = lora_b.clamp(-hi, hi)
        lora_a = lora_a.clamp(-hi, hi)
    kept = s.numel()
    if kept < rank:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(rank - kept, lora_a.shape[1])])
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], rank - kept)], dim=1)
    return lora_a, lora_b


def low_rank(
    m: torch.Tensor,
    rank: int,
    *,
    method: str = "auto",
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [out, r], S [r], Vᴴ [r, in]), r = min(rank, out, in): the leading singular triplets
    of ``m`` (float32), exact or by a randomized range finder (Halko, Martinsson and Tropp,
    2011: Gaussian sketch of rank + oversample columns, power iterations re-orthonormalised by
    QR each step, then an exact SVD of the small projection). The sketch is seeded, so a merge
    gives the same factors every run on one device.

    ``method``: ``"exact"``, ``"randomized"`` or ``"auto"`` (exact when min(out, in) is at most
    ``EXACT_FACTOR * (rank + oversample)``, where the sketch would save little).
    """
    n_out, n_in = m.shape
    r = min(rank, n_out, n_in)
    q = min(rank + oversample, n_out, n_in)
    if method == "auto":
        method = "exact" if min(n_out, n_in) <= EXACT_FACTOR * (rank + oversample) else "randomized"
    if method == "exact" or q >= min(n_out, n_in):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    if method != "randomized":
        raise ValueError(f"method must be auto, exact or randomized, got {method!r}")
    gen = torch.Generator(device=m.device).manual_seed(0)
    sketch = torch.randn(n_in, q, generator=gen, device=m.device, dtype=m.dtype)
    basis = torch.linalg.qr(m @ sketch).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(m @ torch.linalg.qr(m.T @ basis).Q).Q
    ub, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ ub[:, :r]), s[:r], vh[:r]


def _mode(params: MergeParams) -> tuple[int, int]:
    base = params.strategy.elementwise
    elect = reference.ELECT_NONE
    if base.uses_sign_method:
        total = params.sign_method is SignMethod.TOTAL
        elect = reference.ELECT_TOTAL if total else reference.ELECT_FREQUENCY
    if params.density >= 1 or base is Strategy.LINEAR:
        return reference.MODE_NONE, elect
    if base in (Strategy.DARE_LINEAR, Strategy.DARE_TIES):
        return reference.MODE_DARE, elect
    return reference.MODE_TRIM, elect


def _delta_shape(adapters: Sequence[FlatAdapter], module: str) -> tuple[int, int]:
    """(out, in) of ``module``'s ΔW; ValueError when the adapters disagree."""
    shapes = set()
    for a in adapters:
        if a.segment(module, "A") is not None:
            shapes.add((a.segment(module, "B").shape[0], a.segment(module, "A").shape[1]))
    if len(shapes) != 1:
        raise ValueError(f"module {module!r} has ΔW shapes (out, in) {sorted(shapes)} that differ")
    return shapes.pop()


def _output_layout(adapters: Sequence[FlatAdapter], rank: int) -> tuple[Segment, ...]:
    modules = sorted({m for a in adapters for m in a.modules})
    segments, offset = [], 0
    for module in modules:
        for a in adapters:
            if a.segment(module, "A") is not None and a.segment(module, "B") is None:
                raise ValueError(f"module {module!r} lacks lora_B in an adapter that has lora_A")
        n_out, n_in = _delta_shape(adapters, module)
        for part, shape in (("A", (rank, n_in)), ("B", (n_out, rank))):
            segments.append(Segment(module, part, offset, shape))
            offset += shape[0] * shape[1]
    return tuple(segments)


def _module_index(adapter: FlatAdapter) -> dict[str, int]:
    """Module -> its index among the adapter's modules: the ΔW tensor index of the Philox
    counter and of the threshold vectors."""
    index = adapter.cache.get("module_index")
    if index is None:
        index = adapter.cache["module_index"] = {m: k for k, m in enumerate(adapter.modules)}
    return index


def _module_plan(adapters: Sequence[FlatAdapter], module: str, shape) -> MergePlan:
    """A one-tensor plan: input i's ΔW at offset 0 of its workspace row (-1: absent)."""
    in_seg = tuple(_module_index(a).get(module, -1) for a in adapters)
    device = adapters[0].device
    key = (shape, in_seg, str(device))

    def build() -> MergePlan:
        numel = shape[0] * shape[1]

        def column(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return MergePlan(
            segments=(Segment(module, "A", 0, shape),),
            rank=0,
            total=numel,
            seg_out_off=column([0]),
            seg_numel=column([numel]),
            seg_is_b=column([0]),
            in_off=column([[0 if k >= 0 else -1 for k in in_seg]]),
            in_seg=column([list(in_seg)]),
            aligned=numel % 16 == 0,
        )

    return lru_get(_plans, key, build, 1024)


def _threshold_vectors(adapters: Sequence[FlatAdapter], density: float):
    """Per adapter, (float32 [modules] trim thresholds of its ΔW tensors, set of the modules
    computed so far), kept in the adapter's cache: they depend only on it and the density."""
    found = []
    for a in adapters:
        key = ("delta_thresholds", float(density))
        if key not in a.cache:
            vec = torch.full((len(a.modules),), math.nan, dtype=torch.float32, device=a.device)
            a.cache[key] = (vec, set())
        found.append(a.cache[key])
    return found


def _fill_thresholds(adapters, module, buffers, present, density, thresholds, engine) -> None:
    """Compute the missing thresholds of ``module``'s ΔW tensors (one call for all inputs)."""
    missing = [i for i in present if module not in thresholds[i][1]]
    if not missing:
        return
    seg = Segment(module, "A", 0, (buffers[0].numel(), 1))
    views = [FlatAdapter(buffers[i], (seg,), rank=0, scaling=1.0) for i in missing]
    values = engine.segment_thresholds(views, density)
    for i, value in zip(missing, values, strict=True):
        vec, done = thresholds[i]
        vec[_module_index(adapters[i])[module]] = value[0]
        done.add(module)
