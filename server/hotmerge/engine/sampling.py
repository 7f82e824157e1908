"""Sampling on the device for a whole batch, with one host transfer per step.

Per row: repetition penalty (transformers' rule), then greedy, or temperature -> top-k ->
top-p and a draw. The draw is the Gumbel-max trick with noise from a counter-based hash of
(request seed, token index, vocabulary id): a seeded request gives the same tokens whatever
else shares its batch, and no generator state lives on the device.

Logprobs follow the previous engine: a greedy row reports its token's logprob under the raw
distribution, a sampled row under the processed one it was drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hotmerge.generation import SamplingParams

_MASK32 = 0xFFFFFFFF


def is_greedy(params: SamplingParams) -> bool:
    return not params.do_sample or params.temperature == 0


@dataclass
class RowSampling:
    """What sampling needs of one row this step."""

    params: SamplingParams
    seed: int
    index: int  # how many tokens the row has generated before this one
    seen: Sequence[int] = ()  # prompt + generated ids, only when a repetition penalty is set


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on uint32 values held in int64 (wrapping products keep low bits)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def uniform_noise(seeds: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) float64 in (0, 1), a pure function of (seed, index, vocabulary id)."""
    key = _fmix32((seeds & _MASK32) ^ _fmix32((seeds >> 32) & _MASK32))
    key = _fmix32(key ^ _fmix32((index & _MASK32) + 0x9E3779B9))
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _fmix32(key[:, None] ^ _fmix32((ids * 0x27D4EB2F + 0x165667B1) & _MASK32))
    return (h.to(torch.float64) + 0.5) / 2.0**32


def apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    penalised = [
        (i, r) for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0 and r.seen
    ]
    if not penalised:
        return logits
    logits = logits.clone()
    for i, r in penalised:
        idx = torch.tensor(sorted(set(r.seen)), device=logits.device)
        vals = logits[i, idx]
        penalty = r.params.repetition_penalty
        logits[i, idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Rows' logits with tokens outside top-k (k > 0) and the top-p nucleus set to -inf."""
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop |= (torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def sample(logits: torch.Tensor, rows: Sequence[RowSampling]) -> tuple[list[int], list[float]]:
    """One token and its logprob per row of ``logits`` (rows, vocab) float32."""
    device = logits.device
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    logits = apply_repetition_penalty(logits, rows)
    tokens = logits.argmax(dim=-1)
    logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    sampled = [i for i, r in enumerate(rows) if not is_greedy(r.params)]
    if sampled:
        picked = [rows[i] for i in sampled]
        index = torch.tensor(sampled, device=device)
        sub = logits[index]
        temperature = torch.tensor([r.params.temperature for r in picked], device=device)
        sub = sub / temperature[:, None]
        if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in picked):
            top_k = torch.tensor([r.params.top_k for r in picked], device=device)
            top_p = torch.tensor([r.params.top_p for r in picked], device=device)
            sub = filter_top_k_top_p(sub, top_k, top_p)
        seeds = torch.tensor([r.seed for r in picked], device=device, dtype=torch.int64)
        steps = torch.tensor([r.index for r in picked], device=device, dtype=torch.int64)
        gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, sub.shape[-1]))).float()
        drawn = (sub + gumbel).argmax(dim=-1)
        processed = torch.log_softmax(sub, dim=-1).gather(1, drawn[:, None]).squeeze(1)
        tokens = tokens.index_copy(0, index, drawn)
        logprobs = logprobs.index_copy(0, index, processed)
    out = torch.stack([tokens.to(torch.float64), logprobs.to(torch.float64)]).cpu()
    return [int(t) for t in out[0].tolist()], out[1].tolist()
