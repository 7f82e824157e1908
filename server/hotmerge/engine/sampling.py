"""Sampling on the device for a whole batch, with one host transfer per step.

Per row: repetition penalty (transformers' rule), then greedy, or temperature -> top-k ->
top-p and a draw. The draw is the Gumbel-max trick with noise from a counter-based hash of
(request seed, token index, vocabulary id): a seeded request gives the same tokens whatever
else shares its batch, and no generator state lives on the device.

Logprobs follow the previous engine: a greedy row reports its token's logprob under the raw
distribution, a sampled row under the processed one it was drawn from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hotmerge.generation import SamplingParams

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def is_greedy(params: SamplingParams) -> bool:
    return not params.do_sample or params.temperature == 0


@dataclass
class RowSampling:
    """What sampling needs of one row this step."""

    params: SamplingParams
    seed: int
    index: int  # how many tokens the row has generated before this one
    seen: Sequence[int] = ()  # prompt + generated ids, only when a repetition penalty is set
    # With a penalty, a seen token still on the device (a step planned ahead): its index among
    # the previous launch's sampled tokens (``previous`` of ``Sampler.launch``); -1: none.
    seen_pending: int = -1


def as_int64(seed: int) -> int:
    """A 64-bit unsigned seed as the signed int64 with the same bits (the noise reads the bits,
    so seeds >= 2**63 draw as they are; larger values keep their low 64 bits)."""
    seed = int(seed) & _MASK64
    return seed - (1 << 64) if seed >> 63 else seed


def staged_row(r: RowSampling, vocab: int) -> tuple[int, int, int, float, float]:
    """(top_k, seed, index, temperature, top_p) of one sampled row, each in the range the
    device buffers hold: top_k in [0, vocab] (k >= vocab keeps every token), the seed as int64
    bits. Raises ValueError for values no request should carry (checked at entry)."""
    p = r.params
    top_k = min(max(int(p.top_k), 0), vocab)
    temperature, top_p = float(p.temperature), float(p.top_p)
    if not (math.isfinite(temperature) and temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"temperature {temperature!r} / top_p {top_p!r} out of range")
    return top_k, as_int64(r.seed), min(int(r.index), 1 << 62), temperature, top_p


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


def apply_repetition_penalty(
    logits: torch.Tensor, rows: Sequence[RowSampling], previous: torch.Tensor | None = None
) -> torch.Tensor:
    """Each penalised row's seen tokens: a positive logit divided by the penalty, a negative
    one multiplied, once per token however often it was seen. Seen tokens are marked on the
    device: those the host has go in one pinned copy queued behind the step (a plain
    ``torch.tensor(..., device=)`` would block the host until the step is done), and a row's
    token still in flight is read from ``previous`` (the last launch's sampled tokens)."""
    penalised = [
        (i, r)
        for i, r in enumerate(rows)
        if r.params.repetition_penalty != 1.0 and (r.seen or r.seen_pending >= 0)
    ]
    if not penalised:
        return logits
    vocab = logits.shape[-1]
    flat = [i * vocab + t for i, r in penalised for t in set(r.seen)]
    pending = [(i, r.seen_pending) for i, r in penalised if r.seen_pending >= 0]
    factor = [1.0] * len(rows)
    for i, r in penalised:
        factor[i] = r.params.repetition_penalty
    index = torch.tensor(flat, dtype=torch.int64)
    penalty = torch.tensor(factor, dtype=logits.dtype)[:, None]
    pairs = torch.tensor(pending, dtype=torch.int64).reshape(-1, 2).T
    if logits.is_cuda:
        index, penalty, pairs = (
            t.pin_memory().to(logits.device, non_blocking=True) for t in (index, penalty, pairs)
        )
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    seen.view(-1)[index] = True
    if pending:
        if previous is None:
            raise ValueError("a row's seen token is in flight, but no step was launched")
        seen[pairs[0], previous.index_select(0, pairs[1])] = True
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


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


class Sampler:
    """Sampling's fixed buffers: per-row parameters staged in (pinned) host memory and sent with
    one copy, the tokens and logprobs written into one block brought back with one copy.

    ``launch`` queues the work and returns at once; ``wait`` blocks until the results are on
    the host. One launch at a time: the host buffers are reused by the next. A row whose
    parameters cannot be staged is drawn greedily and listed in ``failed`` (row index ->
    reason): the caller fails that row alone, never the batch.
    """

    _PARAMS = 6  # per sampled row: row, top_k, seed, index, temperature, top_p (float64 bits)

    def __init__(self, max_rows: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        # Tokens (int64) then logprobs (float32): 12 bytes a row.
        self._out = torch.empty(12 * max_rows, dtype=torch.uint8, device=device)
        self._out_host = torch.empty(12 * max_rows, dtype=torch.uint8, pin_memory=pin)
        self._params = torch.empty((max_rows, self._PARAMS), dtype=torch.int64, device=device)
        self._params_host = torch.empty((max_rows, self._PARAMS), dtype=torch.int64, pin_memory=pin)
        self._ready = torch.cuda.Event() if pin else None
        self._rows = 0
        self.failed: dict[int, str] = {}

    @staticmethod
    def _split(block: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return block[: 8 * rows].view(torch.int64), block[8 * rows : 12 * rows].view(torch.float32)

    def launch(
        self,
        logits: torch.Tensor | None,
        rows: Sequence[RowSampling],
        previous: torch.Tensor | None = None,
    ) -> None:
        """Queue sampling of one token per row of ``logits`` (rows, vocab) float32;
        ``previous``: the last launch's sampled tokens (rows' ``seen_pending``)."""
        n = self._rows = len(rows)
        self.failed = {}
        if not n:
            return
        tokens, logprobs = self._split(self._out, n)
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = apply_repetition_penalty(logits, rows, previous)
        torch.argmax(logits, dim=-1, out=tokens)
        torch.gather(raw_logprobs, 1, tokens[:, None], out=logprobs[:, None])
        sampled, staged = [], []
        for i, r in enumerate(rows):
            if is_greedy(r.params):
                continue
            try:
                staged.append(staged_row(r, logits.shape[-1]))
                sampled.append(i)
            except (ValueError, TypeError, OverflowError) as err:
                self.failed[i] = f"sampling parameters cannot be used: {err}"
        if sampled:
            self._draw(logits, staged, sampled, tokens, logprobs)
        self._out_host[: 12 * n].copy_(self._out[: 12 * n], non_blocking=True)
        if self._ready is not None:
            self._ready.record()

    def _draw(self, logits, staged, sampled, tokens, logprobs) -> None:
        """The sampled rows: temperature -> top-k -> top-p, then a seeded Gumbel-max draw.
        ``staged``: each row's ``staged_row`` values, already in range."""
        m = len(staged)
        host = self._params_host[:m].numpy()
        host[:, 0] = sampled
        host[:, 1] = [s[0] for s in staged]
        host[:, 2] = [s[1] for s in staged]
        host[:, 3] = [s[2] for s in staged]
        host[:, 4:].view(np.float64)[:] = [(s[3], s[4]) for s in staged]
        params = self._params[:m]
        params.copy_(self._params_host[:m], non_blocking=True)
        index, top_k, seeds, steps = params[:, 0], params[:, 1], params[:, 2], params[:, 3]
        # float32, as the parameters were before they were staged as float64
        temperature, top_p = params[:, 4:].view(torch.float64).float().unbind(1)
        sub = logits[index] / temperature[:, None]
        if any(s[0] > 0 or s[4] < 1.0 for s in staged):
            sub = filter_top_k_top_p(sub, top_k, top_p)
        gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, sub.shape[-1]))).float()
        drawn = (sub + gumbel).argmax(dim=-1)
        processed = torch.log_softmax(sub, dim=-1).gather(1, drawn[:, None]).squeeze(1)
        tokens.index_copy_(0, index, drawn)
        logprobs.index_copy_(0, index, processed)

    @property
    def tokens(self) -> torch.Tensor:
        """The launched rows' tokens on the device (int64): what a step planned ahead feeds
        them, read in stream order."""
        return self._split(self._out, self._rows)[0]

    def wait(self) -> tuple[list[int], list[float]]:
        """The launched rows' tokens and logprobs, once on the host."""
        if not self._rows:
            return [], []
        if self._ready is not None:
            self._ready.synchronize()
        tokens, logprobs = self._split(self._out_host, self._rows)
        return tokens.tolist(), logprobs.tolist()


def sample(logits: torch.Tensor, rows: Sequence[RowSampling]) -> tuple[list[int], list[float]]:
    """One token and its logprob per row of ``logits`` (rows, vocab) float32."""
    sampler = Sampler(len(rows), logits.device)
    sampler.launch(logits, rows)
    return sampler.wait()
