"""The Triton kernels equal their torch twins (through the Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from hotmerge_kernels.layout import FlatAdapter, Segment
from hotmerge_kernels.merge import contract, merge_adapters, reference, trim_thresholds
from hotmerge_kernels.merge.params import MergeParams, SignMethod, Strategy
from hotmerge_kernels.merge.plan import get_plan

from tests.kernels.random_adapters import make_adapter, needs_triton

pytestmark = needs_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ODD_MODULES = {
    "model.layers.0.self_attn.q_proj": (37, 37),
    "model.layers.0.self_attn.k_proj": (37, 5),
    "model.layers.1.mlp.down_proj": (531, 37),  # A spans several merge blocks
}


@pytest.fixture(autouse=True)
def poisoned_output(monkeypatch):
    """Merged buffers start as NaN, so an element a kernel forgets to write fails the test."""

    def new_buffer(numel, dtype, device):
        return torch.full((numel,), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(contract, "_new_buffer", new_buffer)


def adapters(n, *, dtype=torch.float32, overlap=True, ranks=None, modules=ODD_MODULES):
    out = []
    for i in range(n):
        mods = dict(modules)
        if overlap and i % 3 == 2:
            mods.pop(next(iter(mods)))  # partially overlapping target modules
        r = ranks[i] if ranks else 3
        out.append(
            make_adapter(mods, r, seed=1000 + i, scaling=0.5 + i / 4, dtype=dtype, device=DEVICE)
        )
    return out


def assert_merge_close(got: torch.Tensor, want: torch.Tensor, *, slerp: bool = False) -> None:
    assert not got.isnan().any(), "unwritten output elements"
    if DEVICE == "cpu" and not slerp and got.dtype == torch.float32:
        # The interpreter runs the same float32 operations; its rounding to 16 bits may differ.
        assert torch.equal(got, want)
        return
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[got.dtype]
    rtol = max(rtol, 1e-5) if slerp else rtol
    atol = 1e-6 * float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def _case(n, dtype, density, weights):
    return pytest.param(n, dtype, density, weights, id=f"n{n}-{str(dtype)[6:]}-d{density}")


CASES = [  # n, dtype, density, weights
    _case(1, torch.float32, 0.5, (0.8,)),
    _case(2, torch.bfloat16, 0.5, (0.7, -1.3)),
    _case(3, torch.float32, 0.01, (1.0, 0.0, -0.4)),
    _case(3, torch.float16, 1.0, (0.2, 0.9, 0.5)),
    _case(4, torch.float32, 0.4, (0.6, -0.2, 1.1, 0.8)),  # the most inputs TIES keeps in registers
    _case(8, torch.float32, 0.0, (0.3, -0.9, 1.2, 0.0, 0.5, 0.25, -2.0, 1.0)),
    _case(16, torch.bfloat16, 0.3, tuple((-1) ** i * (0.1 + i / 10) for i in range(16))),
]
STRATEGIES = [
    (Strategy.LINEAR, SignMethod.TOTAL),
    (Strategy.MAGNITUDE_PRUNE, SignMethod.TOTAL),
    (Strategy.TIES, SignMethod.TOTAL),
    (Strategy.TIES, SignMethod.FREQUENCY),
    (Strategy.DARE_LINEAR, SignMethod.TOTAL),
    (Strategy.DARE_TIES, SignMethod.FREQUENCY),
]


# At n = 16, linear and magnitude_prune are left out: the other strategies cover that width
# (their loops are a superset), and it keeps the CPU suite short.
MERGE_CASES = [
    pytest.param(strategy, sign, *case.values, id=f"{case.id}-{strategy.value}-{sign.value}")
    for case in CASES
    for strategy, sign in STRATEGIES
    if not (case.values[0] == 16 and strategy in (Strategy.LINEAR, Strategy.MAGNITUDE_PRUNE))
]


@pytest.mark.parametrize("strategy,sign,n,dtype,density,weights", MERGE_CASES)
def test_merge_kernel_equals_reference(strategy, sign, n, dtype, density, weights):
    ads = adapters(n, dtype=dtype)
    params = MergeParams(strategy, weights, density, sign, seed=12345 + n)
    want = merge_adapters(ads, params, backend="torch").adapter
    for a in ads:
        a.cache.clear()  # the kernel computes its own thresholds
    got = merge_adapters(ads, params, backend="triton").adapter
    assert got.segments == want.segments
    assert_merge_close(got.buffer, want.buffer)


@pytest.mark.parametrize("strategy", [Strategy.TIES, Strategy.DARE_TIES], ids=lambda s: s.value)
def test_ties_kernel_beyond_32_adapters_equals_reference(strategy):
    # Past 32 inputs the kernel recomputes trim / DARE in its second pass (no keep bitmask).
    tiny = {"model.layers.0.self_attn.q_proj": (7, 5)}
    ads = [make_adapter(tiny, 2, seed=i, device=DEVICE) for i in range(33)]
    params = MergeParams(strategy, tuple(0.1 * (i % 5 - 2) for i in range(33)), 0.5, seed=4)
    want = merge_adapters(ads, params, backend="torch").adapter
    for a in ads:
        a.cache.clear()
    got = merge_adapters(ads, params, backend="triton").adapter
    assert_merge_close(got.buffer, want.buffer)


@pytest.mark.parametrize("n,ranks", [(1, (3,)), (2, (3, 5)), (3, (2, 3, 4))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cat_kernel_equals_reference(n, ranks, dtype):
    ads = adapters(n, dtype=dtype, ranks=ranks)
    params = MergeParams(Strategy.CAT, (0.7, -1.1, 0.4)[:n])
    want = merge_adapters(ads, params, backend="torch").adapter
    got = merge_adapters(ads, params, backend="triton").adapter
    assert got.rank == want.rank == (sum(ranks) if n > 1 else ranks[0])
    assert_merge_close(got.buffer, want.buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slerp_kernels_equal_reference(dtype):
    ads = adapters(2, dtype=dtype, overlap=False)
    params = MergeParams(Strategy.SLERP, (0.3, 0.7))
    want = merge_adapters(ads, params, backend="torch").adapter
    got = merge_adapters(ads, params, backend="triton").adapter
    assert_merge_close(got.buffer, want.buffer, slerp=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.0, 0.002, 0.5, 0.93])
def test_threshold_kernel_equals_reference(dtype, density):
    ads = adapters(2, dtype=dtype)
    if dtype == torch.bfloat16:  # many ties at the threshold
        ads[1].buffer.copy_((ads[1].buffer * 4).round() / 4 + 0.125)
    want = trim_thresholds(ads, density, backend="torch")
    for a in ads:
        a.cache.clear()
    got = trim_thresholds(ads, density, backend="triton")
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def _dare(ads, density, seed, block=None, backend="triton"):
    from hotmerge_kernels.merge import triton_merge

    engine = triton_merge if backend == "triton" else reference
    plan = get_plan(ads, cat=False)
    out = torch.full((plan.total,), float("nan"), device=DEVICE)
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0]], device=DEVICE)  # adapter 0 alone
    kwargs = {"block": block} if block else {}
    engine.elementwise_merge(
        out, plan, [a.buffer for a in ads], weights, per_segment=False, thresholds=None,
        mode=reference.MODE_DARE, elect=reference.ELECT_NONE, density=density, seed=seed,
        **kwargs,
    )  # fmt: skip
    return out


def test_dare_mask_is_the_same_across_runs_and_block_sizes():
    ads = adapters(2, overlap=False)
    first = _dare(ads, 0.4, seed=7, block=512)
    assert torch.equal(first, _dare(ads, 0.4, seed=7, block=512))
    assert torch.equal(first, _dare(ads, 0.4, seed=7, block=2048))
    assert torch.equal(first, _dare(ads, 0.4, seed=7, backend="torch"))
    assert not torch.equal(first, _dare(ads, 0.4, seed=8, block=512))


@pytest.mark.parametrize("seed", [0xDEADBEEF_FEEDFACE, 0x80000000_7FFFFFFF, (1 << 64) - 1])
def test_dare_mask_equals_the_twin_for_seeds_with_their_high_bits_set(seed):
    """The kernel takes the seed's words as int32 bits (one signature for every seed): words of
    2**31 and above draw what the twin draws from them."""
    ads = adapters(2, overlap=False)
    kernel, twin = _dare(ads, 0.4, seed, block=512), _dare(ads, 0.4, seed, backend="torch")
    assert torch.equal(kernel, twin) and (kernel == 0).any() and (kernel != 0).any()


def test_dare_keep_rate_is_density():
    # The reference draws the same stream as the kernel (tests above); count on a large buffer.
    modules = {f"model.layers.{i}.mlp.up_proj": (256, 96) for i in range(8)}
    ads = [make_adapter(modules, 8, seed=s, device=DEVICE) for s in (1, 2)]
    n = ads[0].buffer.numel()
    for density in (0.1, 0.5, 0.9):
        kept = (_dare(ads, density, seed=99, backend="torch") != 0).sum().item()
        sigma = (n * density * (1 - density)) ** 0.5
        assert abs(kept - n * density) < 5 * sigma, (density, kept, n)
    # Adapters draw independent masks: both kept at about density².
    params = MergeParams(Strategy.DARE_LINEAR, (1.0, 1.0), density=0.5, seed=3)
    plan = get_plan(ads, cat=False)
    keep = []
    for i in range(2):
        seg = plan.in_seg[:, i].repeat_interleave(plan.seg_numel)
        keep.append(reference.dare_keep(3, i, seg, _local(plan), 0.5))
    both = (keep[0] & keep[1]).float().mean().item()
    assert abs(both - 0.25) < 0.01
    assert merge_adapters(ads, params, backend="torch").adapter.buffer.ne(0).any()


def _local(plan):
    start = torch.repeat_interleave(plan.seg_out_off, plan.seg_numel)
    return torch.arange(plan.total, device=start.device) - start


def _segment_thresholds_equal_reference(ads, density, **launch):
    from hotmerge_kernels.merge import triton_merge

    want = reference.segment_thresholds(ads, density)
    got = triton_merge.segment_thresholds(ads, density, **launch)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), (g, w)


# Small blocks and samples, so that tensors span many count programs and the guess is a sample.
SPLIT = {"block": 32, "num_warps": 1, "sample": 64}


@pytest.mark.parametrize(
    "dtype,density",
    [*((torch.bfloat16, d) for d in (0.0, 0.01, 0.5, 0.97, 1.0)),  # ties at the threshold
     *((torch.float32, d) for d in (0.0, 0.01, 0.5, 1.0)),
     *((torch.float16, d) for d in (0.5, 0.97))],
)  # fmt: skip
def test_threshold_kernel_with_tensors_split_over_many_programs(dtype, density):
    ads = adapters(3, dtype=dtype)
    if dtype != torch.float32:  # many ties at the threshold
        ads[2].buffer.copy_((ads[2].buffer * 4).round() / 4 - 0.125)
    _segment_thresholds_equal_reference(ads, density, **SPLIT)


def _tensor_adapter(values: torch.Tensor) -> FlatAdapter:
    seg = Segment("model.layers.0.mlp.up_proj", "A", 0, (1, values.numel()))
    return FlatAdapter(values.to(DEVICE), (seg,), rank=1, scaling=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["above", "below"])
def test_threshold_kernel_when_the_sample_misleads(dtype, where):
    # The sampled runs (at 0 and n / 2) hold magnitudes far from the rest, so the first pass's
    # bins miss the k-th largest and the narrowing passes must find it.
    gen = torch.Generator().manual_seed(5 if where == "above" else 6)
    n = 1000
    x = torch.randn(n, generator=gen) * 0.01
    runs = torch.zeros(n, dtype=torch.bool)
    runs[:32] = runs[500:532] = True
    scale = 100.0 if where == "above" else 1e-4
    x[runs] = torch.randn(int(runs.sum()), generator=gen) * scale
    ads = [_tensor_adapter(x.to(dtype))]
    for density in (0.05, 0.5, 0.9):
        _segment_thresholds_equal_reference(ads, density, **SPLIT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_threshold_kernel_on_ties_and_tiny_tensors(dtype):
    gen = torch.Generator().manual_seed(9)
    signs = torch.randint(0, 2, (300,), generator=gen) * 2 - 1
    level = float(torch.rand(1, generator=gen)) + 0.5
    tensors = [
        signs * level,  # one magnitude: every element ties with the threshold
        signs * torch.where(torch.rand(300, generator=gen) < 0.3, level, 2 * level),  # two
        torch.randn(1, generator=gen),
        torch.randn(2, generator=gen),
        torch.randn(3, generator=gen),
        torch.randn(17, generator=gen) * 1e-30,  # mostly zeros in float16
    ]
    ads = [_tensor_adapter(t.to(dtype)) for t in tensors]
    for density in (0.0, 0.3, 0.5, 0.99, 1.0):
        _segment_thresholds_equal_reference(ads, density, **SPLIT)
        _segment_thresholds_equal_reference(ads, density)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threshold_counters_at_their_bounds(dtype):
    # Most elements share one magnitude, so one bin takes every element of a slot (its four-bit
    # counter reaches 15) and of a program (15·BLOCK keys in one 16-bit field; at the largest
    # BLOCK, 61440 of 65535). Three chunks, the last partial, meet at the tensor's ticket.
    from hotmerge_kernels.merge.thresholds import MAX_BLOCK

    gen = torch.Generator().manual_seed(11)
    n = 2 * 15 * MAX_BLOCK + 1000
    level = float(torch.rand(1, generator=gen)) + 0.5
    x = torch.where(torch.rand(n, generator=gen) < 0.97, level, torch.randn(n, generator=gen))
    x = x * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
    ads = [_tensor_adapter(x.to(dtype)), _tensor_adapter(torch.randn(n, generator=gen).to(dtype))]
    for density in (0.02, 0.5, 0.99):
        _segment_thresholds_equal_reference(ads, density, block=MAX_BLOCK, num_warps=4)
    with pytest.raises(AssertionError):  # a larger block could overflow a 16-bit field
        _segment_thresholds_equal_reference(ads, 0.5, block=2 * MAX_BLOCK)


def test_merge_kernel_with_16_element_alignment_equals_reference():
    # Shapes in multiples of 16 take the kernels' 16-byte access path, absent inputs included.
    modules = {
        "model.layers.0.self_attn.q_proj": (64, 48),
        "model.layers.0.self_attn.k_proj": (32, 16),
        "model.layers.1.mlp.down_proj": (80, 64),
    }
    ads = adapters(3, dtype=torch.bfloat16, modules=modules, ranks=(16, 16, 16))
    assert get_plan(ads, cat=False).aligned
    for strategy in (Strategy.TIES, Strategy.DARE_LINEAR):
        params = MergeParams(strategy, (0.5, -1.0, 0.75), 0.4, seed=77)
        want = merge_adapters(ads, params, backend="torch").adapter
        for a in ads:
            a.cache.clear()
        got = merge_adapters(ads, params, backend="triton").adapter
        assert_merge_close(got.buffer, want.buffer)
