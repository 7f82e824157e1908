"""Merge specs: validation of the wire message, and the keys that name a merge.

``parse_merge_spec`` turns a ``MergedAdapters`` message into a ``MergeSpec`` (adapter ids plus
the engine's ``MergeParams``), applying the defaults and rejecting bad input with
``InvalidArgument`` errors that name the field and the fix. It is the only place a spec is
validated.

Two keys name a spec. Both are the sha256 of one canonical text, made by ``canonical_spec``:

- the **affinity key** (``a-`` + 16 hex digits) covers what the client knows: adapter ids,
  weights, strategy and the parameters that strategy uses. The Python client sends it as
  ``x-merge-key`` request metadata so that a load balancer hashing on it sends one spec to one
  replica; the server reports it too.
- the **cache key** (``m-`` + 16 hex digits) is the affinity key's canonical text plus each
  adapter's content revision and the dtype of the merged adapter. It names the merged adapter in
  the merge cache, metrics and logs. A re-uploaded adapter (new revision) is a new cache key
  under the same affinity key; one spec on servers of different dtypes is two cache keys.

So: affinity key = what a balancer hashes; cache key = affinity key + revisions + dtype.

Canonicalisation rules (change them only together with ``KEY_VERSION``):

- adapters stay in the order given, each paired with its weight. Linear-family merges are
  commutative up to float summation order, but a reordered spec would give a merged adapter
  that differs in the last bits from what that spec merges to, and ``slerp`` and ``cat`` are
  not commutative at all; keeping the order makes one key one exact result.
- weights and density are rounded to float32 (the wire type) and written as Python's shortest
  round-trip repr, with -0.0 written as 0.0.
- only the parameters the strategy uses are included: density for the trimming and DARE
  strategies, the majority sign method for ties and dare_ties, the seed for the DARE strategies
  (their ``_svd`` forms alike), ``svd_rank`` (0 for the default) and ``svd_clamp`` (null for
  none) for the ΔW-space strategies.
  A linear spec with a density set is the same spec as one without.
- defaults are applied before hashing: an unspecified strategy is linear, no weights is 1.0
  each, unset density is 1.0, an unspecified sign method is total.

Duplicate adapter ids are rejected: ``[a, a]`` at weights ``[x, y]`` is ``[a]`` at ``x + y`` for
linear but not for ties (each copy votes in the sign election), so allowing them would give one
merge several spellings. The error tells the client to list each adapter once.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy

from hotmerge.errors import InvalidArgument
from hotmerge.v1 import hotmerge_pb2 as pb

KEY_VERSION = 1
# Weights beyond this are not a meaningful merge, and overflow the merged adapter's dtype.
MAX_WEIGHT = 1000.0
KEY_HEX_DIGITS = 16
MAX_SVD_RANK = 8192  # adapter files' own limit on r (adapters.files.MAX_RANK)
FIELD = "merged_adapters"

_STRATEGIES = {
    pb.MERGE_STRATEGY_UNSPECIFIED: Strategy.LINEAR,
    pb.LINEAR: Strategy.LINEAR,
    pb.TIES: Strategy.TIES,
    pb.DARE_LINEAR: Strategy.DARE_LINEAR,
    pb.DARE_TIES: Strategy.DARE_TIES,
    pb.MAGNITUDE_PRUNE: Strategy.MAGNITUDE_PRUNE,
    pb.CAT: Strategy.CAT,
    pb.SLERP: Strategy.SLERP,
    pb.SVD: Strategy.SVD,
    pb.TIES_SVD: Strategy.TIES_SVD,
    pb.DARE_LINEAR_SVD: Strategy.DARE_LINEAR_SVD,
    pb.DARE_TIES_SVD: Strategy.DARE_TIES_SVD,
    pb.MAGNITUDE_PRUNE_SVD: Strategy.MAGNITUDE_PRUNE_SVD,
}
_STRATEGY_TO_WIRE = {
    strategy: wire
    for wire, strategy in _STRATEGIES.items()
    if wire != pb.MERGE_STRATEGY_UNSPECIFIED
}
_SIGN_METHODS = {
    pb.MAJORITY_SIGN_METHOD_UNSPECIFIED: SignMethod.TOTAL,
    pb.TOTAL: SignMethod.TOTAL,
    pb.FREQUENCY: SignMethod.FREQUENCY,
}
_SIGN_METHOD_TO_WIRE = {SignMethod.TOTAL: pb.TOTAL, SignMethod.FREQUENCY: pb.FREQUENCY}

# Strategies whose merge of one adapter at weight 1 is that adapter's own delta, for the given
# density: linear and cat always, the trimming and DARE strategies when they keep everything.
_IDENTITY_ALWAYS = (Strategy.LINEAR, Strategy.CAT)


@dataclass(frozen=True)
class MergeSpec:
    """What to merge: adapter ids, in order, and the merge parameters (one weight per id)."""

    adapter_ids: tuple[str, ...]
    params: MergeParams

    def to_message(self) -> pb.MergedAdapters:
        """The wire form of this spec (``parse_merge_spec`` of it gives this spec back)."""
        msg = pb.MergedAdapters(
            ids=list(self.adapter_ids),
            weights=list(self.params.weights),
            merge_strategy=_STRATEGY_TO_WIRE[self.params.strategy],
            majority_sign_method=_SIGN_METHOD_TO_WIRE[self.params.sign_method],
            seed=self.params.seed,
        )
        msg.density = self.params.density
        if self.params.svd_rank is not None:
            msg.svd_rank = self.params.svd_rank
        if self.params.svd_clamp is not None:
            msg.svd_clamp = self.params.svd_clamp
        return msg


def parse_merge_spec(msg: pb.MergedAdapters, *, max_adapters: int | None = 16) -> MergeSpec:
    """Validate ``msg`` and apply the defaults; ``max_adapters=None`` means no limit.

    Parameters the strategy does not use are ignored and set to their defaults, so two specs
    that merge the same way compare equal.
    """
    ids = tuple(msg.ids)
    limit = "" if max_adapters is None else f" to {max_adapters}"
    if not ids or (max_adapters is not None and len(ids) > max_adapters):
        raise InvalidArgument(f"{FIELD}.ids: give 1{limit} adapter ids, got {len(ids)}")
    first_seen: dict[str, int] = {}
    for i, adapter_id in enumerate(ids):
        if not adapter_id.strip():
            raise InvalidArgument(f"{FIELD}.ids[{i}] is empty: give an adapter id")
        if adapter_id in first_seen:
            raise InvalidArgument(
                f"{FIELD}.ids: {adapter_id!r} is listed twice (at {first_seen[adapter_id]} and "
                f"{i}); list each adapter once, with its combined weight"
            )
        first_seen[adapter_id] = i

    if len(msg.weights) == 0:
        weights = (1.0,) * len(ids)
    elif len(msg.weights) != len(ids):
        raise InvalidArgument(
            f"{FIELD}.weights: got {len(msg.weights)} weights for {len(ids)} ids; "
            "give one weight per id, or none for 1.0 each"
        )
    else:
        weights = tuple(_f32(w) for w in msg.weights)
        for i, w in enumerate(weights):
            if not math.isfinite(w):
                raise InvalidArgument(f"{FIELD}.weights[{i}] is {w}: weights must be finite")
            if abs(w) > MAX_WEIGHT:
                raise InvalidArgument(
                    f"{FIELD}.weights[{i}] is {w:g}: weights must be within "
                    f"[-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]"
                )

    strategy = _STRATEGIES.get(msg.merge_strategy)
    if strategy is None:
        names = ", ".join(s.value for s in Strategy)
        raise InvalidArgument(
            f"{FIELD}.merge_strategy: unknown value {msg.merge_strategy}; use one of {names}"
        )
    if strategy is Strategy.SLERP and len(ids) != 2:
        raise InvalidArgument(
            f"{FIELD}.merge_strategy: slerp merges exactly 2 adapters, got {len(ids)} ids"
        )

    density = 1.0
    if strategy.uses_density and msg.HasField("density"):
        density = _f32(msg.density)
        if not (0.0 < density <= 1.0):  # also false for nan
            raise InvalidArgument(
                f"{FIELD}.density: {density} is outside (0, 1]; give the fraction of each "
                f"tensor that {strategy.value} keeps, or leave it unset to keep all"
            )

    sign_method = SignMethod.TOTAL
    if strategy.uses_sign_method:
        sign_method = _SIGN_METHODS.get(msg.majority_sign_method)
        if sign_method is None:
            names = ", ".join(m.value for m in SignMethod)
            raise InvalidArgument(
                f"{FIELD}.majority_sign_method: unknown value {msg.majority_sign_method}; "
                f"use one of {names}"
            )

    seed = msg.seed if strategy.uses_seed else 0
    svd_rank = svd_clamp = None
    if strategy.in_delta_space:
        if msg.HasField("svd_rank") and msg.svd_rank > 0:
            svd_rank = msg.svd_rank
            if svd_rank > MAX_SVD_RANK:  # the server bounds it further by what it serves
                raise InvalidArgument(
                    f"{FIELD}.svd_rank: {svd_rank} is more than {MAX_SVD_RANK}; give the rank "
                    "of the merged adapter, or leave it unset for the largest input rank"
                )
        if msg.HasField("svd_clamp"):
            svd_clamp = _f32(msg.svd_clamp)
            if not (0.0 <= svd_clamp <= 1.0):  # also false for nan
                raise InvalidArgument(
                    f"{FIELD}.svd_clamp: {svd_clamp} is outside [0, 1]; give the quantile of "
                    "the factors' entries to clamp them to, or leave it unset for no clamp"
                )
    params = MergeParams(
        strategy=strategy, weights=weights, density=density, sign_method=sign_method, seed=seed,
        svd_rank=svd_rank, svd_clamp=svd_clamp,
    )  # fmt: skip
    return MergeSpec(adapter_ids=ids, params=params)


_SPEC_FIELDS = (
    "ids",
    "weights",
    "merge_strategy",
    "density",
    "majority_sign_method",
    "seed",
    "svd_rank",
    "svd_clamp",
)


def merged_adapters_from_dict(data: Mapping[str, Any], *, where: str = FIELD) -> pb.MergedAdapters:
    """A merge spec written as JSON (LoRAX's ``merged_adapters`` object, a ``--merges`` file
    entry) as the wire message; ``parse_merge_spec`` then validates it.

    Strategy and sign-method names are case-insensitive (``"ties"``, ``"TIES"``); null fields
    are unset. Raises InvalidArgument naming the field (prefixed by ``where``).
    """
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"{where} must be an object with ids, weights, merge_strategy, ...")
    unknown = sorted(set(data) - set(_SPEC_FIELDS))
    if unknown:
        raise InvalidArgument(f"{where}: unknown field(s) {unknown}; known: {list(_SPEC_FIELDS)}")
    msg = pb.MergedAdapters()
    try:
        msg.ids.extend(data.get("ids") or [])
        msg.weights.extend(data.get("weights") or [])
        if data.get("density") is not None:
            msg.density = data["density"]
        for name in ("seed", "svd_rank", "svd_clamp"):
            if data.get(name) is not None:
                setattr(msg, name, data[name])
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"{where}: {err}") from None
    for name, enum in (
        ("merge_strategy", pb.MergeStrategy),
        ("majority_sign_method", pb.MajoritySignMethod),
    ):
        value = data.get(name)
        if value is None:
            continue
        names = [k for k in enum.keys() if "UNSPECIFIED" not in k]  # noqa: SIM118 - not a dict
        if not isinstance(value, str) or value.upper() not in names:
            choices = ", ".join(k.lower() for k in names)
            raise InvalidArgument(f"{where}.{name}: unknown {value!r}; use one of {choices}")
        setattr(msg, name, enum.Value(value.upper()))
    return msg


def canonical_spec(
    spec: MergeSpec, revisions: Sequence[str] | None = None, dtype: str | None = None
) -> str:
    """The canonical text both keys hash: compact JSON with sorted keys (rules in the docstring).

    Without ``revisions`` and ``dtype`` it is the affinity text; with them, the cache-key text.
    """
    p = spec.params
    if len(p.weights) != len(spec.adapter_ids):
        raise ValueError(f"{len(p.weights)} weights for {len(spec.adapter_ids)} adapter ids")
    if revisions is not None and len(revisions) != len(spec.adapter_ids):
        raise ValueError(f"{len(revisions)} revisions for {len(spec.adapter_ids)} adapter ids")
    adapters = []
    for i, (adapter_id, weight) in enumerate(zip(spec.adapter_ids, p.weights, strict=True)):
        adapter = {"id": adapter_id, "weight": _float_text(weight)}
        if revisions is not None:
            adapter["revision"] = str(revisions[i])
        adapters.append(adapter)
    doc: dict[str, object] = {"v": KEY_VERSION, "strategy": p.strategy.value, "adapters": adapters}
    if p.strategy.uses_density:
        doc["density"] = _float_text(p.density)
    if p.strategy.uses_sign_method:
        doc["sign_method"] = p.sign_method.value
    if p.strategy.uses_seed:
        doc["seed"] = int(p.seed)
    if p.strategy.in_delta_space:  # 0: the largest input rank; null: no clamp
        doc["svd_rank"] = int(p.svd_rank or 0)
        doc["svd_clamp"] = None if p.svd_clamp is None else _float_text(p.svd_clamp)
    if dtype is not None:
        doc["dtype"] = str(dtype).removeprefix("torch.")
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def merge_key(spec: MergeSpec, revisions: Sequence[str], dtype: str) -> str:
    """The cache key: ``m-`` + hash of the spec, the adapters' content revisions and the dtype."""
    return "m-" + _short_hash(canonical_spec(spec, revisions, dtype))


def affinity_key(msg_or_spec: pb.MergedAdapters | MergeSpec) -> str:
    """The load-balancer key (``x-merge-key``): ``a-`` + hash of the spec alone.

    A message is validated first (without an adapter limit, which is the server's to enforce),
    so it raises ``InvalidArgument`` where the server would.
    """
    spec = msg_or_spec
    if isinstance(msg_or_spec, pb.MergedAdapters):
        spec = parse_merge_spec(msg_or_spec, max_adapters=None)
    return "a-" + _short_hash(canonical_spec(spec))


def is_identity(spec: MergeSpec) -> bool:
    """True when the merge of ``spec`` is exactly its one adapter, so the server serves that.

    One adapter at weight 1 with linear, cat or a ΔW-space strategy (one adapter merges as
    linear there, as in PEFT), or with a trimming/DARE strategy at density 1 (trim and drop keep
    everything, and a ties election of one adapter keeps every element).
    """
    p = spec.params
    if len(spec.adapter_ids) != 1 or _f32(p.weights[0]) != 1.0:
        return False
    if p.strategy in _IDENTITY_ALWAYS or p.strategy.in_delta_space:
        return True
    return p.strategy.uses_density and p.density == 1.0


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (what the wire carries), with -0.0 made 0.0."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0] + 0.0
    except OverflowError:  # beyond float32's range: what a float32 cast would give
        return math.copysign(math.inf, x)


def _float_text(x: float) -> str:
    return repr(_f32(x))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_HEX_DIGITS]
