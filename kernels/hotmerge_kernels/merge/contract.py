"""Merge several LoRA adapters into one: the merge contract.

``merge_adapters(adapters, params, backend="auto") -> MergeResult`` follows PEFT's
``LoraModel.add_weighted_adapter`` (``peft.utils.merge_utils``) module by module:

- The output has the union of the adapters' modules. Each module's ``lora_A`` and ``lora_B`` are
  merged separately, element by element, over the adapters that have that module (an adapter
  without it is left out, exactly as PEFT does).
- Weights fold in each adapter's LoRA scaling ``s``: A gets ``sign(w·s)·sqrt(|w·s|)``, B gets
  ``sqrt(|w·s|)``. The merged adapter has ``scaling == 1.0`` and the common rank.
- ``linear``: Σ wᵢ·xᵢ. ``magnitude_prune``: trim, then Σ wᵢ·xᵢ.
- ``ties``: trim; elect a sign per element from the trimmed, unweighted inputs (``total``: sign
  of Σ xᵢ, ``frequency``: sign of Σ sign(xᵢ); a zero sum elects +); result = Σ wᵢ·xᵢ over the
  non-zero xᵢ of the elected sign, divided by max(1, how many).
- ``dare_linear`` / ``dare_ties``: each element is kept iff its 16-bit DARE draw (below) is
  < T, T = density·65536 rounded to the nearest integer (halves up) and clamped to [0, 65536]
  (``reference.dare_threshold``), so with probability T/65536, within 2⁻¹⁷ of ``density``;
  kept elements are rescaled by 1/density, the others zeroed; then as linear / ties.
  ``density >= 1`` keeps all (no draws), density 0 none.
- Trim keeps every element whose |x| is >= the k-th largest |x| of its tensor,
  k = int(density·numel): k = 0 keeps nothing, density >= 1 keeps all. Without ties at the
  threshold this is PEFT's top-k; with ties (common in bf16) it keeps them all. Thresholds depend
  only on (adapter, density) and are cached in ``FlatAdapter.cache``.
- ``cat``: A' = [wᵢ·sᵢ·Aᵢ] stacked on rows, B' = [Bᵢ] on columns, rank Σ rᵢ (ranks may differ),
  so ΔW' = Σ wᵢ·sᵢ·Bᵢ·Aᵢ exactly. At a module some adapters lack, the present ones are packed
  first and the remaining rank is zero, as in PEFT.
- ``slerp`` (two adapters; not in PEFT): per tensor, with t = w₁/(w₀+w₁) and inputs
  vᵢ = fᵢ·xᵢ (fᵢ the folded scaling above with wᵢ = 1), the spherical interpolation
  sin((1−t)θ)/sin θ·v₀ + sin(tθ)/sin θ·v₁, θ the angle between v₀ and v₁; when |cos θ| > 0.9995
  or either tensor is zero, the linear (1−t)·v₀ + t·v₁.
- ΔW space (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``; PEFT's ``_svd_generalized_task_arithmetic_weighted_adapter``): per
  module of the union, over the adapters that have it, ΔWᵢ = sᵢ·Bᵢ·Aᵢ in float32; the
  element-wise combination above (linear / ties / dare_linear / dare_ties / magnitude_prune)
  with the raw weights wᵢ (no folding) over the ΔWᵢ; then B' = U·S, A' = Vᴴ of the rank-r
  truncation, r = ``params.svd_rank`` or the largest input rank (zero-padded where r exceeds
  min(out, in)); with ``svd_clamp`` c, both clamped to ±quantile(B' ∪ A', c). Ranks may differ;
  scaling 1. The factorisation (``delta.low_rank``) is an exact SVD for small modules and
  a seeded randomized range finder otherwise; **contract: the rank-r reconstruction's Frobenius
  error is within 0.1% of the exact truncated SVD's**. Singular vectors' signs are free, so
  factors (and a clamp, which sees signed entries) may differ from PEFT's where PEFT's SVD
  picks other signs; B'·A' does not. DARE's counter in ΔW space: (element index in ΔW // 8,
  module index among the adapter's modules, adapter position, 0), the draws as below.
  ``progress(done, total, module)`` is called after each module.
- A single adapter is merged as ``linear`` whatever the strategy (PEFT does the same), except
  ``slerp``, which needs two.
- Arithmetic is float32 whatever the storage dtype; the result is rounded once to the adapters'
  dtype. DARE's random stream is Philox4x32-10 keyed by ``params.seed`` (low 32 bits, high 32
  bits) with counter (element index e in its tensor // 8, tensor index in its adapter, adapter
  position, 0); of the call's output words w0..w3, element e takes draw d = e % 8, bits
  16·(d % 2) .. 16·(d % 2) + 15 of word w(d // 2) (w0 low half, w0 high, w1 low, …, w3 high):
  see ``reference.dare_draws``. Same inputs and seed give the same result on every device and
  backend (up to float32 rounding between the torch and Triton engines).

``ValueError`` for: no adapters, a weight count that differs from the adapter count, different ranks
(except ``cat`` and ΔW space), ``svd_rank`` < 1, ``svd_clamp`` outside [0, 1], ``slerp`` without
exactly two adapters, different shapes of one module, different dtypes or devices, a negative
density, an unknown backend.

``cancel``: a callable polled between chunks (torch engine) and between launches (Triton); when
it returns True the merge stops with ``MergeCancelled`` and its output is dropped.

``backend``: ``"triton"`` runs the Triton kernels (on CUDA, or anywhere under
``TRITON_INTERPRET=1``), ``"torch"`` the torch twins in ``reference``, ``"auto"`` what
``hotmerge_kernels.backend.use_triton`` says (Triton for CUDA tensors unless
``HOTMERGE_TRITON=0``, torch otherwise). ``MergeResult.merge_ms`` is the wall time of the merge
(host clock), the merge's stream synchronised at its end.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hotmerge_kernels.backend import BACKENDS, Backend, resolve_backend
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge import reference
from hotmerge_kernels.merge.delta import Progress, delta_merge
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy
from hotmerge_kernels.merge.plan import MergePlan, get_plan
from hotmerge_kernels.merge.reference import MergeCancelled

__all__ = ["MergeCancelled", "MergeResult", "merge_adapters", "trim_thresholds"]


@dataclass
class MergeResult:
    adapter: FlatAdapter
    merge_ms: float
    backend: str  # "torch" or "triton", the engine that ran


def merge_adapters(
    adapters: Sequence[FlatAdapter],
    params: MergeParams,
    *,
    backend: Backend = "auto",
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> MergeResult:
    adapters = list(adapters)
    _validate(adapters, params, backend)
    device = adapters[0].device
    backend = resolve_backend(backend, adapters[0].buffer)
    engine = _engine(backend)
    # The torch engine polls between its chunks; a Triton launch runs whole (milliseconds).
    stop = {"cancel": cancel} if engine is reference else {}
    reference.check_cancel(cancel)

    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    t0 = time.perf_counter()

    strategy = params.strategy
    if len(adapters) == 1 and strategy is not Strategy.SLERP:
        strategy = Strategy.LINEAR
    if strategy.in_delta_space:

        def step(done: int, total: int, module: str) -> None:  # between modules
            reference.check_cancel(cancel)
            if progress is not None:
                progress(done, total, module)

        merged = delta_merge(adapters, params, engine, progress=step)
        return MergeResult(merged, _elapsed(t0, stream), backend)
    plan = get_plan(adapters, cat=strategy is Strategy.CAT)
    out = _new_buffer(plan.total, adapters[0].dtype, device)
    buffers = [a.buffer for a in adapters]
    if strategy is Strategy.CAT:
        w1 = tuple((w, 1.0) for w in params.weights)  # PEFT: A * weight * scaling, in that order
        w2 = tuple((a.scaling, 1.0) for a in adapters)
        engine.cat_merge(out, plan, buffers, _table(w1), _table(w2), **stop)
    elif strategy is Strategy.SLERP:
        weights = _slerp_weights(plan, engine.pair_stats(plan, buffers, **stop), adapters, params)
        reference.check_cancel(cancel)
        engine.elementwise_merge(
            out, plan, buffers, weights, per_segment=True, thresholds=None,
            mode=reference.MODE_NONE, elect=reference.ELECT_NONE, density=1.0, seed=0, **stop,
        )  # fmt: skip
    else:
        folded = tuple(_fold(w, a.scaling) for w, a in zip(params.weights, adapters, strict=True))
        mode, elect, thresholds = _mode(strategy, params, adapters, backend)
        reference.check_cancel(cancel)
        engine.elementwise_merge(
            out, plan, buffers, _table(folded), per_segment=False,
            thresholds=thresholds, mode=mode, elect=elect, density=params.density,
            seed=params.seed, **stop,
        )  # fmt: skip

    merge_ms = _elapsed(t0, stream)
    return MergeResult(adapter=plan.merged_adapter(out), merge_ms=merge_ms, backend=backend)


def _elapsed(t0: float, stream) -> float:
    """Wall milliseconds since the merge began, its stream synchronised (one sync; no events to
    create and record each call)."""
    if stream is not None:
        stream.synchronize()
    return (time.perf_counter() - t0) * 1e3


def trim_thresholds(
    adapters: Sequence[FlatAdapter], density: float, *, backend: Backend = "auto"
) -> list[torch.Tensor]:
    """Per adapter, float32 [segments]: trim thresholds for ``density``, from the cache or computed
    (all missing adapters in one launch) and cached."""
    adapters = list(adapters)
    key = ("trim_thresholds", float(density))
    missing = [a for a in adapters if key not in a.cache]
    if missing:
        backend = resolve_backend(backend, adapters[0].buffer)
        if density >= 1:
            found = [torch.zeros(len(a.segments), device=a.device) for a in missing]
        else:
            found = _engine(backend).segment_thresholds(missing, density)
        for a, thr in zip(missing, found, strict=True):
            a.cache[key] = thr
    return [a.cache[key] for a in adapters]


_ELECT = {SignMethod.TOTAL: reference.ELECT_TOTAL, SignMethod.FREQUENCY: reference.ELECT_FREQUENCY}


def _mode(strategy: Strategy, params: MergeParams, adapters, backend: str):
    """(pre-merge transform, sign election, trim thresholds or None) for the engines."""
    if strategy is Strategy.LINEAR:
        return reference.MODE_NONE, reference.ELECT_NONE, None
    if strategy in (Strategy.DARE_LINEAR, Strategy.DARE_TIES):
        ties = strategy is Strategy.DARE_TIES
        mode = reference.MODE_DARE if params.density < 1 else reference.MODE_NONE
        return mode, _ELECT[params.sign_method] if ties else reference.ELECT_NONE, None
    thresholds = None
    mode = reference.MODE_NONE
    if params.density < 1:
        thresholds = trim_thresholds(adapters, params.density, backend=backend)
        mode = reference.MODE_TRIM
    ties = strategy is Strategy.TIES
    return mode, _ELECT[params.sign_method] if ties else reference.ELECT_NONE, thresholds


def _fold(weight: float, scaling: float) -> tuple[float, float]:
    """(weight of A, weight of B): sqrt(|w·s|), the sign on A, as PEFT does."""
    ws = weight * scaling
    root = math.sqrt(abs(ws))
    return (root if ws >= 0 else -root), root


@functools.lru_cache(maxsize=256)
def _table(pairs: tuple) -> torch.Tensor:
    """float32 [2, N] from N (A, B) pairs, on the host: the engine moves it with its own tables.
    Kept per distinct pairs (engines only read it), so a repeated merge builds no tensor."""
    return torch.tensor(pairs, dtype=torch.float32).T.contiguous()


def _slerp_weights(plan: MergePlan, stats: torch.Tensor, adapters, params) -> torch.Tensor:
    """float32 [S, 2]: per output tensor, the slerp coefficients times the folded scalings."""
    w0, w1 = params.weights
    t = w1 / (w0 + w1)
    folds = torch.tensor(
        [[_fold(1.0, a.scaling)[p] for a in adapters] for p in (0, 1)], dtype=torch.float64
    ).to(stats.device)
    f = folds[plan.seg_is_b]  # [S, 2]
    s = stats.to(torch.float64)
    dot = s[:, 0] * f[:, 0] * f[:, 1]
    norms = torch.sqrt(s[:, 1]) * f[:, 0].abs() * torch.sqrt(s[:, 2]) * f[:, 1].abs()
    cos = torch.where(norms > 0, dot / norms, 1.0).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    lerp = (norms == 0) | (cos.abs() > 0.9995)
    sin = torch.where(lerp, 1.0, torch.sin(theta))
    c0 = torch.where(lerp, 1.0 - t, torch.sin((1.0 - t) * theta) / sin)
    c1 = torch.where(lerp, t, torch.sin(t * theta) / sin)
    return (torch.stack([c0, c1], dim=1) * f).to(torch.float32).contiguous()


def _new_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, device=device)  # every element is written


def _engine(backend: str):
    """The module that runs a merge: ``reference`` or ``triton_merge`` (same functions)."""
    if backend == "torch":
        return reference
    from hotmerge_kernels.merge import triton_merge  # late: machines without Triton still merge

    return triton_merge


def _validate(adapters: list[FlatAdapter], params: MergeParams, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not adapters:
        raise ValueError("adapters: need at least one adapter to merge")
    if len(params.weights) != len(adapters):
        raise ValueError(f"weights: got {len(params.weights)} weights for {len(adapters)} adapters")
    if not all(math.isfinite(w) for w in params.weights):
        raise ValueError(f"weights must be finite, got {params.weights}")
    dtypes = {a.dtype for a in adapters}
    if len(dtypes) != 1:
        raise ValueError(f"adapters have different dtypes: {sorted(map(str, dtypes))}")
    devices = {a.device for a in adapters}
    if len(devices) != 1:
        raise ValueError(f"adapters are on different devices: {sorted(map(str, devices))}")
    strategy = params.strategy
    if strategy is Strategy.SLERP:
        if len(adapters) != 2:
            raise ValueError(f"slerp merges exactly 2 adapters, got {len(adapters)}")
        if params.weights[0] + params.weights[1] == 0:
            raise ValueError("slerp: weights must not sum to zero (t = w1 / (w0 + w1))")
    if strategy.needs_equal_ranks and len(adapters) > 1:
        ranks = [a.rank for a in adapters]
        if len(set(ranks)) != 1:
            raise ValueError(
                f"{strategy.value} needs adapters of one rank, got ranks {ranks} (use cat)"
            )
    if strategy.uses_density and not params.density >= 0:
        raise ValueError(f"density must be >= 0, got {params.density}")
    if params.svd_rank is not None and params.svd_rank < 1:
        raise ValueError(f"svd_rank must be >= 1, got {params.svd_rank}")
    if params.svd_clamp is not None and not 0 <= params.svd_clamp <= 1:
        raise ValueError(f"svd_clamp must be in [0, 1], got {params.svd_clamp}")
