"""ΔW-space merges (PEFT's ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
``magnitude_prune_svd``): the contract is in ``contract``'s docstring.

Module by module, each adapter's ΔWᵢ = sᵢ·Bᵢ·Aᵢ (float32) is written into a workspace reused for
every module (so the engines' address tables stay the same and memory is bounded by the largest
module), and the element-wise engine (the same kernels, trim thresholds, sign election and Philox
stream as factor-space merges) combines the ΔWᵢ into a merged ΔW, kept in a staging buffer with
the other modules of its shape (up to ``GROUP_BYTES``). ``low_rank`` then factorises the group
to rank r in batched steps: a randomized range finder (oversampling, power iterations) for large
modules, an exact SVD for small ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from hotmerge_kernels.layout import FlatAdapter, Segment
from hotmerge_kernels.lru import LockedLRU
from hotmerge_kernels.merge import reference
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy
from hotmerge_kernels.merge.plan import MergePlan

OVERSAMPLE = 16  # extra columns of the range finder (issue 11: rank + 16, 4 power iterations)
POWER_ITERS = 4
EXACT_FACTOR = 4  # exact SVD when min(out, in) <= EXACT_FACTOR * (rank + OVERSAMPLE)
# Merged ΔWs of one shape are factorised together, up to this many bytes of float32 at once:
# one batched launch per step instead of one per module, memory still bounded.
GROUP_BYTES = 2 << 30
# Directions of a basis below this fraction of its largest singular value are float32 rounding
# noise (their Gram eigenvalues, squared, below 1e-12): dropped rather than blown up.
RELATIVE_FLOOR = 1e-6

Progress = Callable[[int, int, str], None]  # (modules done, modules in all, module)
_PLANS: LockedLRU[MergePlan] = LockedLRU(1024)  # one-module plans by shape and inputs present


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
    strategy; ``engine`` is ``reference`` or ``triton_merge`` for the element-wise step.

    Device memory beyond the output: n workspace rows of the largest ΔW (float32) and one
    staging buffer of at most ``GROUP_BYTES`` (or one ΔW, if larger) for a group's merged ΔWs,
    plus the factorisation's thin matrices (a few ``[group, out or in, rank + oversample]``)."""
    adapters = list(adapters)
    rank = merged_rank(adapters, params)
    layout = _output_layout(adapters, rank)
    out = torch.empty(
        sum(s.numel for s in layout), dtype=adapters[0].dtype, device=adapters[0].device
    )
    merged = FlatAdapter(out, layout, rank=rank, scaling=1.0)
    modules = merged.modules
    shapes = {m: _delta_shape(adapters, m) for m in modules}
    groups = _groups(modules, shapes)
    largest = max((n_out * n_in for n_out, n_in in shapes.values()), default=1)
    n = len(adapters)
    work = torch.empty(n, largest, dtype=torch.float32, device=out.device)
    staging = torch.empty(
        max((len(g) * shapes[g[0]][0] * shapes[g[0]][1] for g in groups), default=1),
        dtype=torch.float32,
        device=out.device,
    )
    mode, elect = _mode(params)
    weights = torch.tensor([params.weights, params.weights], dtype=torch.float32)
    thresholds = (
        _threshold_vectors(adapters, params.density) if mode == reference.MODE_TRIM else None
    )
    done = 0
    for group in groups:
        n_out, n_in = shapes[group[0]]
        numel = n_out * n_in
        deltas = staging[: len(group) * numel].view(len(group), n_out, n_in)
        for g, module in enumerate(group):
            present = []
            for i, a in enumerate(adapters):
                if a.segment(module, "A") is not None:
                    # sᵢ as the GEMM's alpha: no pass of its own over the float32 ΔWᵢ; beta 0
                    # ignores the workspace's old contents (NaN included)
                    delta = work[i, :numel].view(n_out, n_in)
                    delta.addmm_(
                        a.tensor(module, "B").float(), a.tensor(module, "A").float(),
                        beta=0, alpha=a.scaling,
                    )  # fmt: skip
                    present.append(i)
            plan = _module_plan(adapters, module, (n_out, n_in))
            buffers = [work[i, :numel] for i in range(n)]
            if thresholds is not None:
                _fill_thresholds(
                    adapters, module, buffers, present, params.density, thresholds, engine
                )
            engine.elementwise_merge(
                deltas[g].view(-1), plan, buffers, weights, per_segment=False,
                thresholds=[t for t, _ in thresholds] if thresholds is not None else None,
                mode=mode, elect=elect, density=params.density, seed=params.seed,
            )  # fmt: skip
        lora_a, lora_b = factors(deltas, rank, params.svd_clamp)
        for g, module in enumerate(group):
            merged.tensor(module, "A").copy_(lora_a[g])
            merged.tensor(module, "B").copy_(lora_b[g])
            done += 1
            if progress is not None:
                progress(done, len(modules), module)
    return merged


def _groups(modules: Sequence[str], shapes: dict) -> list[list[str]]:
    """The modules by ΔW shape, in runs of at most ``GROUP_BYTES`` of float32 (at least one)."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for module in modules:
        by_shape.setdefault(shapes[module], []).append(module)
    groups = []
    for (n_out, n_in), names in by_shape.items():
        size = max(1, GROUP_BYTES // (4 * n_out * n_in))
        groups += [names[i : i + size] for i in range(0, len(names), size)]
    return groups


def factors(
    delta: torch.Tensor, rank: int, clamp: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [..., rank, in], B [..., out, rank]) with B·A the rank-``rank`` truncation of each
    ``delta`` [..., out, in], as PEFT: B = U·S, A = Vᴴ, then both clamped to
    ±quantile(B ∪ A, clamp) of that module. Zero-padded where ``rank`` exceeds min(out, in)."""
    u, s, vh = low_rank(delta, rank)
    lora_b = u * s.unsqueeze(-2)
    lora_a = vh
    if clamp is not None:
        flat = torch.cat([lora_b.flatten(-2), lora_a.flatten(-2)], dim=-1)
        # one module at a time: torch.quantile refuses inputs over 2**24 elements
        hi = torch.stack([torch.quantile(f, clamp) for f in flat.view(-1, flat.shape[-1])])
        hi = hi.view(*flat.shape[:-1], 1, 1)
        lora_b = lora_b.clamp(-hi, hi)
        lora_a = lora_a.clamp(-hi, hi)
    missing = rank - s.shape[-1]
    if missing > 0:
        lora_a = torch.nn.functional.pad(lora_a, (0, 0, 0, missing))  # zero rows
        lora_b = torch.nn.functional.pad(lora_b, (0, missing))  # zero columns
    return lora_a, lora_b


def low_rank(
    m: torch.Tensor,
    rank: int,
    *,
    method: str = "auto",
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [..., out, r], S [..., r], Vᴴ [..., r, in]), r = min(rank, out, in): the leading
    singular triplets of each ``m`` [..., out, in] (float32; leading dimensions are a batch of
    matrices factorised together), exact or by a randomized range finder (Halko, Martinsson
    and Tropp, 2011: Gaussian sketch of rank + oversample columns, power iterations
    re-orthonormalised each step, then an exact SVD of the small projection). The sketch is
    seeded (one for the whole batch), so a merge gives the same factors every run on one
    device, and a matrix gets the same sketch alone or in a batch.

    ``method``: ``"exact"``, ``"randomized"`` or ``"auto"`` (exact when min(out, in) is at most
    ``EXACT_FACTOR * (rank + oversample)``, where the sketch would save little).
    """
    n_out, n_in = m.shape[-2:]
    r = min(rank, n_out, n_in)
    q = min(rank + oversample, n_out, n_in)
    if method == "auto":
        method = "exact" if min(n_out, n_in) <= EXACT_FACTOR * (rank + oversample) else "randomized"
    if method == "exact" or q >= min(n_out, n_in):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[..., :r], s[..., :r], vh[..., :r, :]
    if method != "randomized":
        raise ValueError(f"method must be auto, exact or randomized, got {method!r}")
    gen = torch.Generator(device=m.device).manual_seed(0)
    sketch = torch.randn(n_in, q, generator=gen, device=m.device, dtype=m.dtype)
    basis = _orthonormal(m @ sketch)
    for _ in range(power_iters):
        basis = _orthonormal(m @ _orthonormal(m.mT @ basis))
    # once more: the second pass makes the columns orthonormal to float32 rounding (as
    # CholeskyQR2), which U = basis·Ub needs; in the iterations only their span matters
    basis = _orthonormal(basis)
    ub, s, vh = _short_svd(basis.mT @ m)
    return basis @ ub[..., :r], s[..., :r], vh[..., :r, :]


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning those of each y [..., rows, k], from the eigendecomposition
    of the k × k Gram matrix in float64: one batched eigh for the whole batch, where a
    Householder QR runs one matrix at a time. Directions under ``RELATIVE_FLOOR`` of the largest
    become zero columns (a rank-deficient y), which stay zero through the next products."""
    y64 = y.double()
    evals, evecs = torch.linalg.eigh(y64.mT @ y64)
    keep = evals > evals[..., -1:] * RELATIVE_FLOOR**2
    scale = torch.where(keep, evals.clamp_min(torch.finfo(evals.dtype).tiny).rsqrt(), 0.0)
    return (y64 @ (evecs * scale.unsqueeze(-2))).to(y.dtype)


def _short_svd(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [..., k, k], S [..., k] descending, Vᴴ [..., k, n]) of each short b [..., k, n],
    k <= n, from the eigendecomposition of b·bᵀ in float64 (k × k, batched) and Vᴴ = S⁻¹·Uᵀ·b;
    rows of Vᴴ under ``RELATIVE_FLOOR`` of the largest singular value are zero."""
    b64 = b.double()
    evals, u = torch.linalg.eigh(b64 @ b64.mT)
    s, u = evals.flip(-1).clamp_min(0).sqrt(), u.flip(-1)
    keep = s > s[..., :1] * RELATIVE_FLOOR
    vh = (u.mT @ b64) / torch.where(keep, s, 1.0).unsqueeze(-1)
    vh = torch.where(keep.unsqueeze(-1), vh, 0.0)
    return u.to(b.dtype), s.to(b.dtype), vh.to(b.dtype)


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

    return _PLANS.get(key, build)


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
