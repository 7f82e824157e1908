"""The torch reference merge equals PEFT bit for bit (float32, no magnitude ties)."""

from __future__ import annotations

import math

import pytest
import torch
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge import merge_adapters, trim_thresholds
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy
from peft.utils import merge_utils

from tests.kernels.random_adapters import SMALL_MODULES, make_adapter

EXTRA_MODULE = {"model.layers.1.mlp.up_proj": (37, 19)}


def peft_merge(adapters, weights, strategy, density, sign_method):
    """PEFT's add_weighted_adapter, module by module, with merge_utils (the LoRAX way)."""
    if len(adapters) == 1:
        strategy = "linear"
    out = {}
    for module in sorted({m for a in adapters for m in a.modules}):
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if module in a.modules]
        if strategy == "cat":
            total = sum(a.rank for a in adapters)
            a_parts = [a.tensor(module, "A") * w * a.scaling for a, w in present]
            b_parts = [a.tensor(module, "B") for a, _ in present]
            lora_a = torch.zeros(total, a_parts[0].shape[1])
            lora_b = torch.zeros(b_parts[0].shape[0], total)
            lora_a[: sum(p.shape[0] for p in a_parts)] = torch.cat(a_parts, 0)
            lora_b[:, : sum(p.shape[1] for p in b_parts)] = torch.cat(b_parts, 1)
            out[(module, "A")], out[(module, "B")] = lora_a, lora_b
            continue
        w_a, w_b = [], []
        for a, w in present:
            ws = w * a.scaling
            w_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
            w_b.append(math.sqrt(abs(ws)))
        for part, pw in (("A", w_a), ("B", w_b)):
            tensors = [a.tensor(module, part).clone() for a, _ in present]
            pw = torch.tensor(pw)
            if strategy == "linear":
                merged = merge_utils.task_arithmetic(tensors, pw)
            elif strategy == "magnitude_prune":
                merged = merge_utils.magnitude_prune(tensors, pw, density)
            elif strategy == "ties":
                merged = merge_utils.ties(tensors, pw, density, sign_method)
            elif strategy == "dare_linear":
                merged = merge_utils.dare_linear(tensors, pw, density)
            elif strategy == "dare_ties":
                merged = merge_utils.dare_ties(tensors, pw, density, sign_method)
            out[(module, part)] = merged
    return out


def assert_equals_peft(result: FlatAdapter, expected: dict) -> None:
    assert {(s.module, s.part) for s in result.segments} == set(expected)
    for (module, part), tensor in expected.items():
        ours = result.tensor(module, part)
        assert torch.equal(ours, tensor.to(ours.dtype)), (module, part)


def adapters_for(n: int, *, overlap: bool, ranks=None):
    ranks = ranks or [4] * n
    out = []
    for i in range(n):
        modules = dict(SMALL_MODULES)
        if overlap and i % 2 == 1:
            modules.pop("model.layers.0.self_attn.v_proj")
        if overlap and i == n - 1:
            modules.update(EXTRA_MODULE)
        out.append(make_adapter(modules, ranks[i], seed=100 + i, scaling=0.5 + i))
    return out


CASES = [
    (1, (0.8,)),
    (2, (0.7, -1.3)),
    (3, (1.0, 0.0, -0.4)),
    (4, (0.3, 0.9, -1.2, 2.0)),
]


@pytest.mark.parametrize(
    "strategy,sign",
    [
        ("linear", "total"),
        ("magnitude_prune", "total"),
        ("ties", "total"),
        ("ties", "frequency"),
        ("cat", "total"),
    ],
)
@pytest.mark.parametrize("n,weights", CASES)
@pytest.mark.parametrize("density", [0.0, 0.013, 0.5, 1.0])
def test_reference_equals_peft_merge_utils(strategy, sign, n, weights, density):
    ranks = [4, 3, 5, 2][:n] if strategy == "cat" else None
    adapters = adapters_for(n, overlap=n > 1, ranks=ranks)
    params = MergeParams(Strategy(strategy), weights, density, SignMethod(sign))
    result = merge_adapters(adapters, params, backend="torch")
    expected = peft_merge(adapters, weights, strategy, density, sign)
    assert_equals_peft(result.adapter, expected)
    assert result.adapter.scaling == 1.0
    assert result.adapter.rank == (sum(ranks) if strategy == "cat" and n > 1 else 4)


@pytest.mark.parametrize("strategy", ["linear", "ties"])
def test_reference_matches_peft_for_many_adapters(strategy):
    # torch.sum over 5+ stacked tensors adds in an order that depends on the tensor's width
    # (vectorised body vs tail), so bit equality holds up to 4 adapters; here, to rounding.
    adapters = adapters_for(7, overlap=True)
    weights = (0.3, 0.9, -1.2, 2.0, 0.5, -0.7, 1.1)
    params = MergeParams(Strategy(strategy), weights, density=0.5)
    result = merge_adapters(adapters, params, backend="torch").adapter
    for (module, part), tensor in peft_merge(adapters, weights, strategy, 0.5, "total").items():
        torch.testing.assert_close(result.tensor(module, part), tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_dare_at_density_one_equals_peft(strategy):
    adapters = adapters_for(3, overlap=True)
    weights = (0.6, -0.2, 1.5)
    params = MergeParams(Strategy(strategy), weights, density=1.0, seed=3)
    result = merge_adapters(adapters, params, backend="torch")
    assert_equals_peft(result.adapter, peft_merge(adapters, weights, strategy, 1.0, "total"))


def test_thresholds_are_kth_largest_magnitude():
    adapter = make_adapter(SMALL_MODULES, 4, seed=7)
    for density in (0.01, 0.37, 0.5, 0.99):
        (thr,) = trim_thresholds([adapter], density, backend="torch")
        for k_seg, (seg, tensor) in enumerate(adapter.items()):
            k = int(density * seg.numel)
            expected = torch.topk(tensor.abs().flatten(), k).values[-1] if k else math.inf
            assert thr[k_seg].item() == float(expected)


def test_trim_keeps_ties_at_threshold_in_bf16():
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(-3, 4, (8, 50), generator=gen).to(torch.bfloat16) * 0.25
    values[values == 0] = 0.125
    adapter = FlatAdapter.from_tensors(
        {("m", "A"): values, ("m", "B"): values.T.contiguous()}, rank=8, scaling=1.0
    )
    (thr,) = trim_thresholds([adapter], 0.3, backend="torch")
    k = int(0.3 * 400)
    assert thr[0].item() == torch.sort(values.abs().flatten().float(), descending=True)[0][k - 1]
    params = MergeParams(Strategy.MAGNITUDE_PRUNE, (1.0, 1.0), density=0.3)
    other = FlatAdapter.from_tensors(
        {("m", "A"): values * 0.5, ("m", "B"): values.T * 0.5}, rank=8, scaling=1.0
    )
    merged = merge_adapters([adapter, other], params, backend="torch").adapter
    assert int((merged.tensor("m", "A") != 0).sum()) >= k


def test_validation_errors():
    a = make_adapter(SMALL_MODULES, 4, seed=1)
    b = make_adapter(SMALL_MODULES, 8, seed=2)
    linear = MergeParams(Strategy.LINEAR, (1.0, 1.0))
    with pytest.raises(ValueError, match="one rank"):
        merge_adapters([a, b], linear)
    merge_adapters([a, b], MergeParams(Strategy.CAT, (1.0, 1.0)))  # cat takes any ranks
    with pytest.raises(ValueError, match="slerp"):
        merge_adapters([a, a, a], MergeParams(Strategy.SLERP, (1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="weights"):
        merge_adapters([a, a], MergeParams(Strategy.LINEAR, (1.0,)))
    with pytest.raises(ValueError, match="dtypes"):
        merge_adapters([a, make_adapter(SMALL_MODULES, 4, seed=3, dtype=torch.bfloat16)], linear)
    with pytest.raises(ValueError, match="devices"):
        meta = FlatAdapter(torch.empty(a.buffer.numel(), device="meta"), a.segments, 4, 2.0)
        merge_adapters([a, meta], linear)
    wide = dict(SMALL_MODULES, **{"model.layers.0.self_attn.q_proj": (41, 37)})
    with pytest.raises(ValueError, match="different shapes"):
        merge_adapters([a, make_adapter(wide, 4, seed=4)], linear)
    with pytest.raises(ValueError, match="backend"):
        merge_adapters([a], linear, backend="cuda")
    with pytest.raises(ValueError, match="density"):
        merge_adapters([a, a], MergeParams(Strategy.TIES, (1.0, 1.0), density=-0.1))


def test_thresholds_are_cached_per_density():
    adapters = adapters_for(2, overlap=False)
    params = MergeParams(Strategy.TIES, (1.0, 0.5), density=0.4)
    first = merge_adapters(adapters, params, backend="torch").adapter.buffer
    assert ("trim_thresholds", 0.4) in adapters[0].cache
    cached = adapters[0].cache[("trim_thresholds", 0.4)]
    second = merge_adapters(adapters, params, backend="torch").adapter.buffer
    assert adapters[0].cache[("trim_thresholds", 0.4)] is cached
    assert torch.equal(first, second)


def test_one_adapter_at_weight_w_is_w_delta():
    adapter = make_adapter(SMALL_MODULES, 4, seed=9, scaling=0.75)
    merged = merge_adapters([adapter], MergeParams(Strategy.TIES, (-0.6,), 0.3)).adapter
    for module in adapter.modules:
        delta = merged.tensor(module, "B") @ merged.tensor(module, "A")
        expected = -0.6 * 0.75 * adapter.tensor(module, "B") @ adapter.tensor(module, "A")
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)


def test_slerp_of_parallel_adapters_is_linear_and_of_orthogonal_is_spherical():
    a = make_adapter(SMALL_MODULES, 4, seed=11, scaling=1.0)
    b = FlatAdapter(a.buffer * 3.0, a.segments, 4, 1.0)
    merged = merge_adapters([a, b], MergeParams(Strategy.SLERP, (0.75, 0.25))).adapter
    torch.testing.assert_close(merged.buffer, a.buffer * 0.75 + b.buffer * 0.25)
    # Two orthogonal tensors of equal norm, t = 1/2: both coefficients sin(pi/4)/sin(pi/2).
    x = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0]])
    u = FlatAdapter.from_tensors({("m", "A"): x, ("m", "B"): x.T}, rank=1, scaling=1.0)
    v = FlatAdapter.from_tensors({("m", "A"): y, ("m", "B"): y.T}, rank=1, scaling=1.0)
    merged = merge_adapters([u, v], MergeParams(Strategy.SLERP, (1.0, 1.0))).adapter
    c = math.sqrt(0.5)
    torch.testing.assert_close(merged.tensor("m", "A"), torch.tensor([[c, c]]))
