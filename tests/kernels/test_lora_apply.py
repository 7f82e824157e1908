"""Multi-LoRA shrink/expand: the Triton kernels equal their torch twins (Triton interpreter on
CPU), and the twins equal a plain per-token loop. Pool columns past each slot's rank are NaN, so
reading them fails; ``buf`` and ``y`` start poisoned or random. ``buf`` has one split or several
(shrink's partial sums over ranges of ``in``, which expand adds up)."""

from __future__ import annotations

import pytest
import torch
from hotmerge_kernels.ops import lora, reference
from hotmerge_kernels.ops.lora import (
    LoraKernelMeta,
    lora_apply,
    lora_expand,
    lora_shrink,
)

from tests.kernels.random_adapters import needs_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RANKS = (8, 16, 64, 128, 5, 0)  # slot ranks of the small pool: the last slot is empty
MAX_RANK = 128
IN_FEATURES = 37
WIDTHS = [(19, 7, 5), (23, 9), (29,)]  # output widths of the slices: q/k/v, gate/up, o
TOL = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6}


def make_pool(widths, *, dtype, ranks=RANKS, n_in=IN_FEATURES, max_rank=MAX_RANK, seed=0):
    """(lora_a, lora_b, slot_ranks, slice_offsets); every entry past a slot's rank is NaN."""
    gen = torch.Generator().manual_seed(seed)
    slots, out_total = len(ranks), sum(widths)
    lora_a = torch.randn(slots, len(widths), max_rank, n_in, generator=gen) * 0.3
    lora_b = torch.randn(slots, max_rank, out_total, generator=gen) * 0.3
    for i, r in enumerate(ranks):
        lora_a[i, :, r:] = float("nan")
        lora_b[i, r:] = float("nan")
    offsets = tuple(sum(widths[:i]) for i in range(len(widths) + 1))
    slot_ranks = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    return lora_a.to(DEVICE, dtype), lora_b.to(DEVICE, dtype), slot_ranks, offsets


def slots_of(pattern, seed=0):
    return torch.tensor(pattern, dtype=torch.int32, device=DEVICE)


def random_slots(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, len(RANKS), (n,), generator=gen).to(torch.int32).to(DEVICE)


SLOT_MIXES = {
    "one row, rank 128": lambda: slots_of([3]),
    "distinct with -1 and empty": lambda: slots_of([4, -1, 0, 5, 2, 1, 3]),
    "33 mixed repeats": lambda: random_slots(33, seed=7),
    "17 rows of one slot": lambda: slots_of([2] * 17),
    "all -1": lambda: slots_of([-1] * 5),
}


@pytest.fixture(params=["rows", "grouped"])
def kernel_path(request, monkeypatch):
    """Both kernel pairs on the same small inputs: per-row decode kernels (T up to
    DECODE_MAX_TOKENS), and the slot-grouped tile kernels of prefill."""
    if request.param == "grouped":
        monkeypatch.setattr(lora, "DECODE_MAX_TOKENS", 0)
    return request.param


def random_rows(t, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t, n, generator=gen).to(DEVICE, dtype)


def poisoned_buf(num_slices, t, splits=1):
    return torch.full((splits, num_slices, t, MAX_RANK), float("nan"), device=DEVICE)


def loop_reference(x, y, lora_a, lora_b, slot_ranks, offsets, token_slots):
    """The definition, one token at a time in float32: (buf entries by (s, t), y as float32)."""
    buf, y = {}, y.float().clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot < 0 or int(slot_ranks[slot]) == 0:
            continue
        r = int(slot_ranks[slot])
        for s, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
            h = lora_a[slot, s, :r].float() @ x[t].float()
            buf[s, t] = h
            y[t, lo:hi] += h @ lora_b[slot, :r, lo:hi].float()
    return buf, y


def defined(buf, slot_ranks, token_slots):
    """The sums over splits of the entries that shrink defines, flattened (rank prefixes of rows
    with a slot); a split left unwritten shows as NaN."""
    parts = []
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            parts.append(buf[:, :, t, : int(slot_ranks[slot])].sum(0).reshape(-1))
    return torch.cat(parts) if parts else buf.new_empty(0)


def assert_close(got, want, tol):
    assert not got.float().isnan().any(), "unwritten or over-read entries"
    atol = tol * max(float(want.float().abs().max()), 1.0) if want.numel() else 0.0
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=atol)


def assert_untouched(y_after, y_before, token_slots, slot_ranks, offsets):
    """Rows of slot -1 or of an empty slot, and columns outside the slices, are bit-identical."""
    skip = [
        t for t, s in enumerate(token_slots.tolist()) if s < 0 or int(slot_ranks[s]) == 0
    ]  # fmt: skip
    assert torch.equal(y_after[skip], y_before[skip])
    assert torch.equal(y_after[:, : offsets[0]], y_before[:, : offsets[0]])
    assert torch.equal(y_after[:, offsets[-1] :], y_before[:, offsets[-1] :])


def run_both(x, y, pool, token_slots, *, kernel: bool, splits=1):
    lora_a, lora_b, slot_ranks, offsets = pool
    buf = poisoned_buf(lora_a.shape[1], x.shape[0], splits)
    if kernel:
        lora_shrink(x, lora_a, slot_ranks, token_slots, buf)
    else:
        reference.lora_shrink(x, lora_a, slot_ranks, token_slots, buf)
    shrunk = buf.clone()
    y = y.clone()
    if kernel:
        lora_expand(buf, lora_b, slot_ranks, token_slots, y, offsets)
    else:
        reference.lora_expand(buf, lora_b, slot_ranks, token_slots, y, offsets)
    return shrunk, y


@pytest.mark.parametrize("widths", WIDTHS, ids=lambda w: f"{len(w)}slices")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", SLOT_MIXES)
def test_twins_equal_per_token_loop(mix, dtype, widths):
    pool = make_pool(widths, dtype=dtype)
    token_slots = SLOT_MIXES[mix]()
    t = token_slots.shape[0]
    x = random_rows(t, IN_FEATURES, dtype, seed=1)
    y0 = random_rows(t, sum(widths), dtype, seed=2)
    buf, y = run_both(x, y0, pool, token_slots, kernel=False)
    want_buf, want_y = loop_reference(x, y0, *pool, token_slots)
    for (s, row), h in want_buf.items():
        assert_close(buf[0, s, row, : h.shape[0]], h, TOL[torch.float32])
    assert_close(y, want_y, TOL[dtype])
    assert_untouched(y, y0, token_slots, pool[2], pool[3])


@needs_triton
@pytest.mark.parametrize("widths", WIDTHS, ids=lambda w: f"{len(w)}slices")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", SLOT_MIXES)
def test_kernels_equal_twins(kernel_path, mix, dtype, widths, splits=1, seed=3):
    pool = make_pool(widths, dtype=dtype, seed=seed)
    token_slots = SLOT_MIXES[mix]()
    t = token_slots.shape[0]
    x = random_rows(t, IN_FEATURES, dtype, seed=seed + 1)
    y0 = random_rows(t, sum(widths), dtype, seed=seed + 2)
    got_buf, got_y = run_both(x, y0, pool, token_slots, kernel=True, splits=splits)
    want_buf, want_y = run_both(x, y0, pool, token_slots, kernel=False, splits=splits)
    slot_ranks = pool[2]
    assert_close(
        defined(got_buf, slot_ranks, token_slots),
        defined(want_buf, slot_ranks, token_slots),
        TOL[torch.float32],
    )
    # Same products, another summation order: y may differ by a rounding step of its dtype.
    tol = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    assert_close(got_y, want_y, tol)
    assert_untouched(got_y, y0, token_slots, slot_ranks, pool[3])


@needs_triton
@pytest.mark.parametrize(  # 37 inputs in 16-wide steps: 3 ranges, and with 4 a 4th empty
    "mix,splits",
    [("distinct with -1 and empty", 3), ("distinct with -1 and empty", 4),
     ("33 mixed repeats", 4)],  # the slowest mix under the interpreter: once
)  # fmt: skip
def test_kernels_equal_twins_with_splits(kernel_path, mix, splits):
    for seed, (dtype, widths) in enumerate(zip(DTYPES, WIDTHS, strict=True)):
        test_kernels_equal_twins(kernel_path, mix, dtype, widths, splits, seed=100 + 3 * seed)


@needs_triton
def test_expand_sums_random_splits_in_order(kernel_path):
    """Expand of a buf whose splits all hold random partials (not the twin's total-and-zeros)."""
    pool = make_pool(WIDTHS[0], dtype=torch.bfloat16, seed=24)
    lora_a, lora_b, slot_ranks, offsets = pool
    token_slots = random_slots(21, seed=25)
    buf = torch.randn(5, 3, 21, MAX_RANK, generator=torch.Generator().manual_seed(26))
    y0 = random_rows(21, offsets[-1], torch.bfloat16, seed=27)
    got, want = y0.clone(), y0.clone()
    lora_expand(buf.to(DEVICE), lora_b, slot_ranks, token_slots, got, offsets)
    reference.lora_expand(buf.to(DEVICE), lora_b, slot_ranks, token_slots, want, offsets)
    assert_close(got, want, 2**-7)
    assert_untouched(got, y0, token_slots, slot_ranks, offsets)


@needs_triton
def test_expand_reads_only_rank_prefix_of_buf(kernel_path):
    """buf past each rank and rows of slot -1 are NaN; expand must not read them."""
    pool = make_pool(WIDTHS[0], dtype=torch.bfloat16, seed=6)
    lora_a, lora_b, slot_ranks, offsets = pool
    token_slots = random_slots(19, seed=8)
    buf = poisoned_buf(3, 19, splits=2)
    x = random_rows(19, IN_FEATURES, torch.bfloat16, seed=9)
    reference.lora_shrink(x, lora_a, slot_ranks, token_slots, buf)  # defines only the rank prefixes
    y0 = random_rows(19, offsets[-1], torch.bfloat16, seed=10)
    got, want = y0.clone(), y0.clone()
    lora_expand(buf, lora_b, slot_ranks, token_slots, got, offsets)
    reference.lora_expand(buf, lora_b, slot_ranks, token_slots, want, offsets)
    assert_close(got, want, 2**-7)


@needs_triton
def test_strided_views_and_reused_meta(kernel_path):
    """x, buf and y are views into bigger buffers (buf: leading splits and slices of a larger
    workspace, as the engine's groups use it); one meta serves two steps of different T."""
    dtype, widths = torch.float16, (11, 6)
    lora_a, lora_b, slot_ranks, offsets = make_pool(widths, dtype=dtype, seed=11)
    meta = LoraKernelMeta(max_tokens=24, num_slots=len(RANKS), device=DEVICE)
    for step, token_slots in enumerate((random_slots(21, seed=12), slots_of([1, 1, -1, 3]))):
        t = token_slots.shape[0]
        meta.update(token_slots)
        x_big = random_rows(t, IN_FEATURES + 8, dtype, seed=13 + step)
        x = x_big[:, 3 : 3 + IN_FEATURES]
        buf_big = torch.full((3, 3, 30, MAX_RANK), float("nan"), device=DEVICE)
        buf = buf_big[:2, :2, 2 : 2 + t]
        y_big = random_rows(t, 40, dtype, seed=15 + step)
        before = y_big.clone()
        y = y_big[:, 7 : 7 + sum(widths)]
        lora_shrink(x, lora_a, slot_ranks, token_slots, buf, meta)
        lora_expand(buf, lora_b, slot_ranks, token_slots, y, offsets, meta)
        want_buf, want_y = run_both(
            x, before[:, 7 : 7 + sum(widths)], (lora_a, lora_b, slot_ranks, offsets), token_slots,
            kernel=False, splits=2,
        )  # fmt: skip
        assert_close(
            defined(buf, slot_ranks, token_slots),
            defined(want_buf, slot_ranks, token_slots),
            1e-5,
        )
        assert_close(y, want_y, 2**-10)
        assert buf_big[:, :, :2].isnan().all() and buf_big[:, :, 2 + t :].isnan().all()
        assert buf_big[2:].isnan().all() and buf_big[:, 2:].isnan().all()
        assert torch.equal(y_big[:, :7], before[:, :7])
        assert torch.equal(y_big[:, 7 + sum(widths) :], before[:, 7 + sum(widths) :])


def test_meta_groups_tokens_by_slot():
    token_slots = slots_of([3, -1, 3, 0, 5, 0, 3])
    meta = LoraKernelMeta(max_tokens=10, num_slots=6, device=DEVICE)
    meta.group_slot.fill_(7)  # stale entries from an earlier step must be cleared
    meta.update(token_slots)
    assert meta.num_tokens == 7
    assert meta.order[:7].tolist() == [1, 3, 5, 0, 2, 6, 4]  # stable sort by slot
    assert meta.group_slot.tolist() == [-1, 0, 3, 5] + [-1] * 6
    assert meta.group_count[:4].tolist() == [1, 2, 3, 1]
    assert meta.group_start[:4].tolist() == [0, 1, 3, 6]
    assert meta.num_tiles.item() == 3  # one tile for each group with a slot
    assert meta.tile_group[:3].tolist() == [1, 2, 3] and meta.tile_m0[:3].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="tokens"):
        lora_shrink(
            random_rows(4, 8, torch.float32, 0),
            torch.zeros(6, 1, 8, 8, device=DEVICE),
            torch.ones(6, dtype=torch.int32, device=DEVICE),
            slots_of([0, 1, 2, 3]),
            torch.zeros(1, 1, 4, 8, device=DEVICE),
            meta,
        )


def test_the_tile_list_covers_each_group_with_a_slot_in_tiles_of_block_m():
    """Tiles of PREFILL_BLOCK_M tokens per group, in group order, base-model tokens left out;
    the list fits its shape-only bound however the tokens fall into groups."""
    m = lora.PREFILL_BLOCK_M
    counts = {1: 2 * m + 3, -1: m + 5, 4: m, 2: 1}  # slot: tokens
    pattern = [slot for slot, n in counts.items() for _ in range(n)]
    gen = torch.Generator().manual_seed(3)
    token_slots = slots_of([pattern[i] for i in torch.randperm(len(pattern), generator=gen)])
    meta = LoraKernelMeta(max_tokens=len(pattern) + 7, num_slots=6, device=DEVICE)
    meta.update(token_slots)
    n = meta.num_tiles.item()
    got = list(zip(meta.tile_group[:n].tolist(), meta.tile_m0[:n].tolist(), strict=True))
    # groups in slot order: -1 (0, no tiles), 1 (group 1: 3 tiles), 2 (group 2), 4 (group 3)
    assert got == [(1, 0), (1, m), (1, 2 * m), (2, 0), (3, 0)]
    assert n <= meta.max_tiles == lora.max_tiles(len(pattern) + 7, 6)
    for tokens in range(1, 3 * m):  # worst cases: every group one token past a whole tile
        meta = LoraKernelMeta(max_tokens=tokens, num_slots=5, device=DEVICE)
        groups = min(tokens, 6)
        sizes = [tokens // groups + (i < tokens % groups) for i in range(groups)]
        meta.update(slots_of([i for i, size in enumerate(sizes) for _ in range(size)]))
        assert meta.num_tiles.item() == sum(-(-size // m) for size in sizes) <= meta.max_tiles


def test_a_mixed_steps_one_token_groups_get_a_program_each():
    """31 decode rows of distinct adapters and a 128-token prompt: no program walks two tiles
    (walking one-token tiles one after another made a mixed step's expand 7x a decode's)."""
    t, num_slots = 31 + 128, 64
    meta = LoraKernelMeta(max_tokens=t, num_slots=num_slots, device=DEVICE)
    meta.update(slots_of(list(range(1, 32)) + [0] * 128))
    assert meta.num_tiles.item() == 31 + -(-128 // lora.PREFILL_BLOCK_M)
    assert lora._tile_programs(t, num_slots) >= meta.num_tiles.item()


@needs_triton
def test_prefill_programs_walk_more_tiles_than_there_are_programs(monkeypatch):
    """30 slots, 70 tokens in runs of 2-4 (a mixed step's decode rows, then a prompt), with one
    extra program a column: more tiles than a grid column has programs, so each program walks
    several; the result equals the twin's."""
    monkeypatch.setattr(lora, "EXTRA_TILE_PROGRAMS", 1)
    ranks = (16, 8, 0, 5, 64, 128) * 5
    pool = make_pool(WIDTHS[0], dtype=torch.bfloat16, ranks=ranks, seed=21)
    gen = torch.Generator().manual_seed(22)
    run_slots = (torch.randperm(30, generator=gen)[:20] - 1).tolist()
    run_lengths = (2 + torch.randint(0, 3, (20,), generator=gen)).tolist()
    runs = zip(run_slots, run_lengths, strict=True)
    pattern = [s for s, n in runs for _ in range(n)] + [4] * 20
    token_slots = slots_of(pattern)
    t = len(pattern)
    assert t > lora.DECODE_MAX_TOKENS  # the prefill kernels
    meta = LoraKernelMeta(max_tokens=t, num_slots=len(ranks), device=DEVICE)
    meta.update(token_slots)
    assert meta.num_tiles.item() > lora._tile_programs(t, len(ranks))
    x = random_rows(t, IN_FEATURES, torch.bfloat16, seed=23)
    y0 = random_rows(t, pool[3][-1], torch.bfloat16, seed=24)
    got_buf, got = run_both(x, y0, pool, token_slots, kernel=True, splits=2)
    want_buf, want = run_both(x, y0, pool, token_slots, kernel=False, splits=2)
    assert_close(defined(got_buf, pool[2], token_slots), defined(want_buf, pool[2], token_slots),
                 1e-5)  # fmt: skip
    assert_close(got, want, 2**-7)
    assert_untouched(got, y0, token_slots, pool[2], pool[3])


@needs_triton
@pytest.mark.parametrize("splits", [1, 4])
def test_shrink_writes_only_defined_entries(kernel_path, splits):
    """Entries past the rank and rows of -1 keep their sentinel in every split, and every split
    of the others is written (an empty range as zeros); A's NaN past the rank is never read."""
    lora_a, _, slot_ranks, _ = make_pool(WIDTHS[1], dtype=torch.bfloat16, seed=17)
    token_slots = random_slots(20, seed=18)
    x = random_rows(20, IN_FEATURES, torch.bfloat16, seed=19)
    got, want = (torch.full((splits, 2, 20, MAX_RANK), 1234.5, device=DEVICE) for _ in range(2))
    lora_shrink(x, lora_a, slot_ranks, token_slots, got)
    reference.lora_shrink(x, lora_a, slot_ranks, token_slots, want)
    assert torch.equal(got == 1234.5, want == 1234.5)
    assert_close(
        defined(got, slot_ranks, token_slots), defined(want, slot_ranks, token_slots), 1e-5
    )


@needs_triton
@pytest.mark.parametrize("apply", [reference.lora_apply, lora_apply], ids=["torch", "triton"])
def test_lora_apply_matches_loop(kernel_path, apply):
    dtype = torch.bfloat16
    pool = make_pool(WIDTHS[0], dtype=dtype, seed=20)
    token_slots = random_slots(9, seed=21)
    x = random_rows(9, IN_FEATURES, dtype, seed=22)
    y0 = random_rows(9, sum(WIDTHS[0]), dtype, seed=23)
    y = y0.clone()
    lora_a, lora_b, slot_ranks, offsets = pool
    buf = poisoned_buf(3, 9, splits=2)
    apply(x, y, lora_a, lora_b, slot_ranks, token_slots, offsets, buf)
    _, want = loop_reference(x, y0, *pool, token_slots)
    assert_close(y, want, TOL[dtype])
