"""DARE's random stream, pinned: the 16-bit keep threshold, Philox4x32-10 against its published
known answers, and which draw each element takes, computed here the plain way (Python integers,
one element at a time) and compared with the torch twin and the Triton kernel."""

from __future__ import annotations

import pytest
import torch
from hotmerge_kernels.layout import FlatAdapter, Segment
from hotmerge_kernels.merge import reference
from hotmerge_kernels.merge.plan import get_plan

from tests.kernels.random_adapters import needs_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U32 = 0xFFFFFFFF


def philox(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 (Salmon et al., SC 2011) on Python integers, written from the paper."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & U32, (p0 >> 32) ^ c3 ^ k1, p0 & U32
        k0, k1 = (k0 + 0x9E3779B9) & U32, (k1 + 0xBB67AE85) & U32
    return c0, c1, c2, c3


# Random123's known-answer vectors for philox4x32_10: (counter, key, output).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((U32,) * 4, (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def expected_draw(seed: int, adapter: int, tensor: int, element: int) -> int:
    """The contract, element by element: counter (element // 8, tensor, adapter, 0), key the
    seed's (low, high) 32 bits; draw d = element % 8 is bits 16·(d % 2) .. +15 of word d // 2."""
    words = philox((element // 8, tensor, adapter, 0), (seed & U32, seed >> 32 & U32))
    d = element % 8
    return words[d // 2] >> (16 * (d % 2)) & 0xFFFF


@pytest.mark.parametrize("counter,key,want", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, want):
    assert philox(counter, key) == want
    got = reference.philox4x32(*(torch.tensor([c]) for c in counter), *key)
    assert tuple(int(w) for w in got) == want


def test_keep_threshold():
    # The nearest integer to density · 65536, halves up, clamped to [0, 65536].
    assert reference.dare_threshold(0.0) == 0
    assert reference.dare_threshold(2**-18) == 0  # 0.25 rounds down
    assert reference.dare_threshold(2**-17) == 1  # 0.5 rounds up
    assert reference.dare_threshold(3 * 2**-17) == 2  # 1.5
    assert reference.dare_threshold(0.3) == 19661  # 19660.8
    assert reference.dare_threshold(0.5) == 32768
    assert reference.dare_threshold(1 - 2**-18) == 65536
    assert reference.dare_threshold(1.0) == 65536
    assert reference.dare_threshold(7.5) == 65536
    gen = torch.Generator().manual_seed(0)
    for density in torch.rand(1000, generator=gen, dtype=torch.float64).tolist():
        assert abs(reference.dare_threshold(density) / 65536 - density) <= 2**-17


def test_twin_draws_follow_the_contract():
    seed = 0x1234_5678_9ABC  # both key words matter
    local = torch.cat([torch.arange(0, 40), torch.arange(8 * 12345 - 3, 8 * 12345 + 21)])
    for adapter, tensor in ((0, 0), (2, 5), (1, 70000)):
        got = reference.dare_draws(seed, adapter, torch.tensor(tensor), local).tolist()
        want = [expected_draw(seed, adapter, tensor, e) for e in local.tolist()]
        assert got == want, (adapter, tensor)
    # Per element segments (as the engines pass them) and the keep mask.
    segments = torch.arange(len(local)) % 3
    keep = reference.dare_keep(seed, 1, segments, local, 0.3)
    want = [
        expected_draw(seed, 1, s, e) < 19661
        for s, e in zip(segments.tolist(), local.tolist(), strict=True)
    ]
    assert keep.tolist() == want


def _flat(shapes: dict, value: float, rank: int = 3) -> FlatAdapter:
    """An adapter whose every element is ``value``, with one tensor per (module, part)."""
    segments, offset = [], 0
    for (module, part), shape in shapes.items():
        segments.append(Segment(module, part, offset, shape))
        offset += shape[0] * shape[1]
    buffer = torch.full((offset,), value, device=DEVICE)
    return FlatAdapter(buffer, tuple(segments), rank=rank, scaling=1.0)


def _kept(engine, ads, plan, adapter: int, density: float, seed: int, **launch):
    """Which output elements DARE keeps of input ``adapter`` (weight 1, the others 0)."""
    out = torch.full((plan.total,), float("nan"), device=DEVICE)
    weights = torch.zeros(2, len(ads), device=DEVICE)
    weights[:, adapter] = 1.0
    engine.elementwise_merge(
        out, plan, [a.buffer for a in ads], weights, per_segment=False, thresholds=None,
        mode=reference.MODE_DARE, elect=reference.ELECT_NONE, density=density, seed=seed,
        **launch,
    )  # fmt: skip
    assert not out.isnan().any()
    return out != 0


# Tensors of odd sizes (groups of 8 straddle tensors and blocks); the adapters list them in
# different orders, so an input's tensor index differs from the output's.
SHAPES = {
    ("model.layers.0.mlp.down_proj", "A"): (3, 53),
    ("model.layers.0.mlp.down_proj", "B"): (37, 3),
    ("model.layers.0.self_attn.q_proj", "A"): (3, 37),
    ("model.layers.0.self_attn.q_proj", "B"): (37, 3),
    ("model.layers.1.self_attn.v_proj", "A"): (3, 211),
    ("model.layers.1.self_attn.v_proj", "B"): (11, 3),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_draw_to_element_mapping(backend):
    from hotmerge_kernels.merge import contract

    engine = contract._engine(backend)
    items = list(SHAPES.items())
    orders = [items, items[::-1], items[2:] + items[:2]]
    ads = [_flat(dict(order), 1.0 + i) for i, order in enumerate(orders)]
    plan = get_plan(ads, cat=False)
    seed, density = 0x1234_5678_9ABC, 0.3
    for adapter, a in enumerate(ads):
        index = [(s.module, s.part) for s in a.segments]
        want = []
        for s in plan.segments:
            t = index.index((s.module, s.part))
            want += [expected_draw(seed, adapter, t, e) < 19661 for e in range(s.numel)]
        # Small blocks (many programs: slow under the interpreter) for the first adapter only.
        launches = [{"block": 16}, {}] if backend == "triton" and adapter == 0 else [{}]
        for launch in launches:
            got = _kept(engine, ads, plan, adapter, density, seed, **launch)
            assert got.tolist() == want, (adapter, launch)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_kept_fraction_over_a_large_tensor(backend):
    from hotmerge_kernels.merge import contract

    engine = contract._engine(backend)
    n = 1 << 19
    up = "model.layers.0.mlp.up_proj"
    ads = [_flat({(up, "A"): (1, n), (up, "B"): (8, 1)}, 0.5, rank=1)]
    plan = get_plan(ads, cat=False)
    # Large blocks: the interpreter's cost is per program.
    launch = {"block": 1 << 14} if backend == "triton" and DEVICE == "cpu" else {}
    for density in (0.1, 0.37, 0.9):
        kept = int(_kept(engine, ads, plan, 0, density, seed=2024, **launch).sum())
        sigma = (n * density * (1 - density)) ** 0.5
        assert abs(kept - n * density) < 5 * sigma, (density, kept, n)
    assert not _kept(engine, ads, plan, 0, 0.0, seed=2024, **launch).any()
