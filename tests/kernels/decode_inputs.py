"""Random inputs of one decode step's elementwise ops at Llama-7B-like sizes (never zeros), and
the tolerance the fused ops are held to. Shared by the fused-op tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sizes:
    hidden: int = 4096
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    num_blocks: int = 256
    block_size: int = 16
    max_positions: int = 8192


SEVEN_B = Sizes()
# One unit in the last place relative to the value, at its largest ([1, 2): 2**-7 in bf16).
ULP = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def assert_within_roundings(got: torch.Tensor, want: torch.Tensor, fp32_rtol: float) -> None:
    """A fused op against its twin. Their float32 sums and exp run in another order, which can
    move an intermediate across a rounding boundary of the 16-bit dtype; rounded again after a
    multiply, the output is then at most 2 ulps away. Such moves are rare: at most 1% of the
    16-bit elements may differ at all."""
    assert not got.isnan().any(), "unwritten output elements"
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=fp32_rtol, atol=1e-6)
        return
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * ULP[got.dtype], atol=1e-6)
    differ = (got != want).float().mean().item()
    assert differ <= 0.01, f"{differ:.2%} of the elements differ from the twin"


@dataclass
class DecodeInputs:
    x: torch.Tensor  # (T, hidden): a layer's output, to be added to the residual
    residual: torch.Tensor  # (T, hidden)
    norm_weight: torch.Tensor  # (hidden,)
    head_norm_weight: torch.Tensor  # (head_dim,), Qwen3's q_norm
    qkv: torch.Tensor  # (T, (num_heads + 2 * num_kv_heads) * head_dim): the fused projection
    positions: torch.Tensor  # (T,) int64
    cos: torch.Tensor  # (max_positions, head_dim / 2) float32
    sin: torch.Tensor
    k_cache: torch.Tensor  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor  # (T,) int64, distinct slots, every 7th row padding (-1)
    gate_up: torch.Tensor  # (T, 2 * intermediate)
    sizes: Sizes

    def qkv_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.sizes
        T, q_end = self.qkv.shape[0], s.num_heads * s.head_dim
        k_end = q_end + s.num_kv_heads * s.head_dim
        return (
            self.qkv[:, :q_end].view(T, s.num_heads, s.head_dim),
            self.qkv[:, q_end:k_end].view(T, s.num_kv_heads, s.head_dim),
            self.qkv[:, k_end:].view(T, s.num_kv_heads, s.head_dim),
        )

    def clone(self) -> DecodeInputs:
        fields = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return DecodeInputs(**fields)

    def refill(self, seed: int) -> None:
        """New random values in the same buffers (a graph replays on the same addresses)."""
        fresh = decode_inputs(self.x.shape[0], self.x.dtype, self.x.device, self.sizes, seed)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                value.copy_(getattr(fresh, name))


def decode_inputs(
    T: int, dtype: torch.dtype, device: str, sizes: Sizes = SEVEN_B, seed: int = 0
) -> DecodeInputs:
    s = sizes
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    half = s.head_dim // 2
    inv_freq = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float32) * 2 / s.head_dim)
    freqs = torch.arange(s.max_positions, dtype=torch.float32)[:, None] * inv_freq
    slots = torch.randperm(s.num_blocks * s.block_size, generator=gen)[:T]
    slots[::7] = -1
    return DecodeInputs(
        x=randn(T, s.hidden),
        residual=randn(T, s.hidden, scale=4.0),
        norm_weight=randn(s.hidden, scale=0.2) + 1,
        head_norm_weight=randn(s.head_dim, scale=0.2) + 1,
        qkv=randn(T, (s.num_heads + 2 * s.num_kv_heads) * s.head_dim, scale=2.0),
        positions=torch.randint(0, s.max_positions, (T,), generator=gen).to(device),
        cos=freqs.cos().to(device),
        sin=freqs.sin().to(device),
        k_cache=randn(s.num_blocks, s.block_size, s.num_kv_heads, s.head_dim),
        v_cache=randn(s.num_blocks, s.block_size, s.num_kv_heads, s.head_dim),
        slot_mapping=slots.to(device),
        gate_up=randn(T, 2 * s.intermediate, scale=2.0),
        sizes=s,
    )
