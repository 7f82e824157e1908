"""The fused decode kernels equal their torch twins, and the twins equal transformers' modules.

CPU: the kernels run through the Triton interpreter on small odd shapes; fresh random inputs,
outputs poisoned with NaN so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton.language as tl
from hotmerge_kernels.ops import reference
from hotmerge_kernels.ops.fused import (
    SILU_BLOCK,
    rms_norm,
    rotary_and_cache,
    silu_and_mul,
)
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from triton.runtime import interpreter

from tests.kernels.decode_inputs import assert_within_roundings
from tests.kernels.random_adapters import needs_triton

pytestmark = needs_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5
ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
    },
    "yarn": {  # attention_scaling != 1
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}  # fmt: skip


@pytest.fixture(autouse=True)
def bf16_rounds_to_nearest(monkeypatch):
    """The Triton interpreter truncates float32 to bf16; the device rounds to nearest even.
    Round like the device, so that bf16 results can be compared exactly."""
    truncating = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            f32 = torch.from_numpy(np.array(data, dtype=np.float32))
            return f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return truncating(data, src, dst, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


def rand(*shape, dtype=torch.float32, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def nans(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert_within_roundings(got, want, fp32_rtol=2e-6)


# ---------------------------------------------------------------------------------------------
# rms_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, H", [(1, 37), (5, 37), (3, 300), (2, 5120)])
def test_rms_norm_equals_twin(dtype, T, H):
    x = rand(T, H, dtype=dtype, seed=1, scale=3.0)
    weight = rand(H, dtype=dtype, seed=2)
    out = nans(T, H, dtype=dtype)
    assert rms_norm(x, weight, EPS, out=out) is out
    assert_close(out, reference.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_with_residual_writes_the_sum_into_residual(dtype):
    x = rand(4, 53, dtype=dtype, seed=3)
    residual = rand(4, 53, dtype=dtype, seed=4, scale=5.0)
    weight = rand(53, dtype=dtype, seed=5)
    want_res = residual.clone()
    want, _ = reference.rms_norm(x, weight, EPS, residual=want_res)
    out = nans(4, 53, dtype=dtype)
    got, res_out = rms_norm(x, weight, EPS, residual=residual, out=out)
    assert got is out and res_out is residual
    assert torch.equal(residual, want_res)  # one rounded add: no room for any difference
    assert torch.equal(want_res, (x + rand(4, 53, dtype=dtype, seed=4, scale=5.0)))
    assert_close(got, want)


def test_rms_norm_in_place_and_allocating():
    x = rand(3, 41, dtype=torch.bfloat16, seed=6)
    weight = rand(41, dtype=torch.bfloat16, seed=7)
    want = reference.rms_norm(x, weight, EPS)
    fresh = rms_norm(x.clone(), weight, EPS)
    assert_close(fresh, want)
    inplace = x.clone()
    assert rms_norm(inplace, weight, EPS, out=inplace) is inplace
    assert torch.equal(inplace, fresh)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_per_head_on_a_fused_qkv_view(dtype):
    """Qwen3's q_norm: each head of a strided (T, heads, head_dim) view, normed in place."""
    T, nh, nkv, hd = 3, 5, 2, 24
    qkv = rand(T, (nh + 2 * nkv) * hd, dtype=dtype, seed=8)
    weight = rand(hd, dtype=dtype, seed=9)
    want = reference.rms_norm(qkv[:, : nh * hd].reshape(T, nh, hd), weight, EPS)
    before = qkv.clone()
    q = qkv[:, : nh * hd].view(T, nh, hd)
    out = nans(T, nh, hd, dtype=dtype)
    assert_close(rms_norm(q, weight, EPS, out=out), want)
    rms_norm(q, weight, EPS, out=q)
    assert torch.equal(q, out)
    assert torch.equal(qkv[:, nh * hd :], before[:, nh * hd :])  # k and v untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_twin_equals_transformers(dtype):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    H, hd = 61, 16
    norm = LlamaRMSNorm(H, eps=EPS).to(dtype=dtype, device=DEVICE)
    head_norm = Qwen3RMSNorm(hd, eps=EPS).to(dtype=dtype, device=DEVICE)
    with torch.no_grad():
        norm.weight.copy_(rand(H, seed=10))
        head_norm.weight.copy_(rand(hd, seed=11))
        x = rand(6, H, dtype=dtype, seed=12, scale=2.0)
        residual = rand(6, H, dtype=dtype, seed=13)
        assert torch.equal(reference.rms_norm(x, norm.weight, EPS), norm(x))
        res = residual.clone()
        out, _ = reference.rms_norm(x, norm.weight, EPS, residual=res)
        assert torch.equal(out, norm(residual + x)) and torch.equal(res, residual + x)
        heads = rand(6, 3, hd, dtype=dtype, seed=14)
        assert torch.equal(reference.rms_norm(heads, head_norm.weight, EPS), head_norm(heads))


# ---------------------------------------------------------------------------------------------
# rotary_and_cache

T, NH, NKV, HD = 5, 3, 2, 20  # head_dim / 2 = 10: not a power of two
BLOCKS, BLOCK_SIZE, MAX_POS = 4, 3, 96
POSITIONS = [17, 0, 95, 4, 63]
SLOTS = [7, -1, 0, 11, -1]  # two padding rows


def rope_tables(rope: str) -> tuple[torch.Tensor, torch.Tensor, LlamaRotaryEmbedding]:
    """float32 (MAX_POS, HD / 2) cos and sin, as the engine builds them from the model."""
    config = LlamaConfig(
        hidden_size=NH * HD, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=HD,
        max_position_embeddings=MAX_POS, rope_parameters=ROPE[rope],
    )  # fmt: skip
    rotary = LlamaRotaryEmbedding(config).to(DEVICE)
    probe = torch.zeros(1, device=DEVICE)
    cos, sin = rotary(probe, torch.arange(MAX_POS, device=DEVICE)[None])
    return cos[0, :, : HD // 2].contiguous(), sin[0, :, : HD // 2].contiguous(), rotary


def qkv_views(qkv: torch.Tensor):
    """q, k, v as strided views into one fused projection output, as the engine has them."""
    q = qkv[:, : NH * HD].view(-1, NH, HD)
    k = qkv[:, NH * HD : (NH + NKV) * HD].view(-1, NKV, HD)
    v = qkv[:, (NH + NKV) * HD :].view(-1, NKV, HD)
    return q, k, v


def run_rotary(fn, qkv, cache, rope="default", slots=SLOTS, positions=POSITIONS):
    cos, sin, _ = rope_tables(rope)
    qkv, (k_cache, v_cache) = qkv.clone(), (c.clone() for c in cache)
    pos = torch.tensor(positions, device=DEVICE)
    slot_mapping = torch.tensor(slots, device=DEVICE)
    assert fn(*qkv_views(qkv), pos, cos, sin, k_cache, v_cache, slot_mapping) is None
    return qkv, k_cache, v_cache


def poisoned_cache(dtype, slots):
    """Random caches whose target slots hold NaN: unwritten targets fail, others must survive."""
    caches = []
    for seed in (21, 22):
        cache = rand(BLOCKS, BLOCK_SIZE, NKV, HD, dtype=dtype, seed=seed)
        flat = cache.view(-1, NKV, HD)
        flat[[s for s in slots if s >= 0]] = float("nan")
        caches.append(cache)
    return caches


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope", list(ROPE))
def test_rotary_and_cache_equals_twin(dtype, rope):
    qkv = rand(T, (NH + 2 * NKV) * HD, dtype=dtype, seed=20, scale=2.0)
    cache = poisoned_cache(dtype, SLOTS)
    got = run_rotary(rotary_and_cache, qkv, cache, rope)
    want = run_rotary(reference.rotary_and_cache, qkv, cache, rope)
    # Products of two stored values are exact in float32; each sum rounds once: bit equal.
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        assert torch.equal(g, w)
    q, k, v = qkv_views(got[0])
    assert not torch.equal(q, qkv_views(qkv)[0]) and torch.equal(v, qkv_views(qkv)[2])
    k_flat, v_flat = (c.view(-1, NKV, HD) for c in got[1:])
    for t, slot in enumerate(SLOTS):
        if slot >= 0:
            assert torch.equal(k_flat[slot], k[t]) and torch.equal(v_flat[slot], v[t])
    untouched = [s for s in range(BLOCKS * BLOCK_SIZE) if s not in SLOTS]
    for new, old in zip(got[1:], cache, strict=True):
        assert torch.equal(new.view(-1, NKV, HD)[untouched], old.view(-1, NKV, HD)[untouched])


@pytest.mark.parametrize("slots", [[-1] * T, [3, 2, 1, 0, 8]], ids=["all-padding", "all-rows"])
def test_rotary_cache_all_or_no_rows_written(slots):
    qkv = rand(T, (NH + 2 * NKV) * HD, dtype=torch.bfloat16, seed=23)
    cache = poisoned_cache(torch.bfloat16, slots)
    got = run_rotary(rotary_and_cache, qkv, cache, slots=slots)
    want = run_rotary(reference.rotary_and_cache, qkv, cache, slots=slots)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_without_cache(dtype):
    cos, sin, _ = rope_tables("llama3")
    qkv = rand(T, (NH + 2 * NKV) * HD, dtype=dtype, seed=24)
    pos = torch.tensor(POSITIONS, device=DEVICE)
    got, want = qkv.clone(), qkv.clone()
    rotary_and_cache(*qkv_views(got)[:2], None, pos, cos, sin)
    reference.rotary_and_cache(*qkv_views(want)[:2], None, pos, cos, sin)
    assert torch.equal(got, want) and not torch.equal(got, qkv)
    assert torch.equal(got[:, (NH + NKV) * HD :], qkv[:, (NH + NKV) * HD :])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope", list(ROPE))
def test_rotary_equals_transformers(dtype, rope):
    """Twin and kernel equal apply_rotary_pos_emb with LlamaRotaryEmbedding's cos/sin."""
    _, _, rotary = rope_tables(rope)
    qkv = rand(T, (NH + 2 * NKV) * HD, dtype=dtype, seed=25, scale=3.0)
    q, k, _ = qkv_views(qkv)
    pos = torch.tensor(POSITIONS, device=DEVICE)
    cos, sin = rotary(qkv, pos[None])  # (1, T, HD) in the model dtype
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    for fn in (reference.rotary_and_cache, rotary_and_cache):
        got, _, _ = run_rotary(fn, qkv, poisoned_cache(dtype, SLOTS), rope)
        q_got, k_got, _ = qkv_views(got)
        assert torch.equal(q_got, q_hf[0].transpose(0, 1)), fn.__name__
        assert torch.equal(k_got, k_hf[0].transpose(0, 1)), fn.__name__


# ---------------------------------------------------------------------------------------------
# silu_and_mul


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, inter", [(1, 45), (4, 45), (3, SILU_BLOCK + 77)])
def test_silu_and_mul_equals_twin(dtype, T, inter):
    gate_up = rand(T, 2 * inter, dtype=dtype, seed=30, scale=3.0)
    out = nans(T, inter, dtype=dtype)
    assert silu_and_mul(gate_up, out) is out
    assert_close(out, reference.silu_and_mul(gate_up))
    assert_close(silu_and_mul(gate_up), out)


def test_silu_and_mul_strided_rows():
    wide = rand(3, 2 * 45 + 9, dtype=torch.bfloat16, seed=31)
    gate_up = wide[:, : 2 * 45]  # rows 99 apart
    out_wide = nans(3, 50, dtype=torch.bfloat16)
    out = out_wide[:, :45]
    silu_and_mul(gate_up, out)
    assert_close(out, reference.silu_and_mul(gate_up))
    assert out_wide[:, 45:].isnan().all()  # nothing written past the row


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_twin_equals_llama_mlp(dtype):
    config = LlamaConfig(
        hidden_size=24, num_attention_heads=2, intermediate_size=45, hidden_act="silu"
    )
    mlp = LlamaMLP(config).to(dtype=dtype, device=DEVICE)
    x = rand(4, 24, dtype=dtype, seed=32, scale=2.0)
    with torch.no_grad():
        gate_up = torch.cat((mlp.gate_proj(x), mlp.up_proj(x)), dim=-1)
        want = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        if dtype == torch.float32:  # torch's CPU silu rounds a strided gate unlike a dense one
            assert_close(reference.silu_and_mul(gate_up), want)
        else:
            assert torch.equal(reference.silu_and_mul(gate_up), want)
            assert torch.equal(mlp.down_proj(reference.silu_and_mul(gate_up)), mlp(x))
        assert_close(silu_and_mul(gate_up), want)


# ---------------------------------------------------------------------------------------------
# Edges


def test_zero_tokens_is_a_no_op():
    x = rand(0, 37, seed=40)
    weight = rand(37, seed=41)
    assert rms_norm(x, weight, EPS).shape == (0, 37)
    out, res = rms_norm(x, weight, EPS, residual=rand(0, 37, seed=42))
    assert out.shape == res.shape == (0, 37)
    assert silu_and_mul(rand(0, 90, seed=43)).shape == (0, 45)
    qkv = rand(0, (NH + 2 * NKV) * HD, seed=44)
    cos, sin, _ = rope_tables("default")
    cache = [rand(BLOCKS, BLOCK_SIZE, NKV, HD, seed=s) for s in (45, 46)]
    before = [c.clone() for c in cache]
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    rotary_and_cache(*qkv_views(qkv), empty, cos, sin, *cache, empty)
    assert all(torch.equal(c, b) for c, b in zip(cache, before, strict=True))


def test_bad_shapes_are_refused():
    x = rand(3, 37, seed=50)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, rand(36, seed=51), EPS)
    with pytest.raises(ValueError, match="residual"):
        residual = x.clone()
        rms_norm(x, rand(37, seed=51), EPS, residual=residual, out=residual)
    with pytest.raises(ValueError, match="gate_up"):
        silu_and_mul(rand(3, 37, seed=52))
    qkv = rand(T, (NH + 2 * NKV) * HD, seed=53)
    cos, sin, _ = rope_tables("default")
    q, k, v = qkv_views(qkv)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary_and_cache(q, k, v, torch.tensor(POSITIONS), cos, sin, *poisoned_cache(
            torch.float32, []), None)  # fmt: skip
