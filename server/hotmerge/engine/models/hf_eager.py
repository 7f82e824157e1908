"""Any other architecture: transformers' own forward, eagerly, one sequence at a time.

Each sequence keeps a transformers DynamicCache (the paged pool only bounds admission here);
LoRA is added by wrapping the target Linear layers, each forward using one adapter (its
sequence's). Slow but general: the fallback for models our forward does not cover.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from hotmerge_kernels.layout import FlatAdapter
from torch import nn

from hotmerge.engine.batch import DecodeRow, PrefillChunk
from hotmerge.engine.kv_cache import block_bytes
from hotmerge.engine.runner import ModelRunner, kv_capacity_blocks


class LoraLinear(nn.Module):
    """A base nn.Linear plus the LoRA delta of the adapter of the current forward."""

    def __init__(self, base: nn.Linear, module_path: str, current: list) -> None:
        super().__init__()
        self.base = base
        self.module_path = module_path
        self.current = current  # [FlatAdapter | None], shared by all wrapped layers

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        adapter: FlatAdapter | None = self.current[0]
        if adapter is None or adapter.segment(self.module_path, "A") is None:
            return y
        a = adapter.tensor(self.module_path, "A").to(x.dtype)
        b = adapter.tensor(self.module_path, "B").to(x.dtype)
        return y + adapter.scaling * ((x @ a.T) @ b.T)


def wrap_linears(model: nn.Module, current: list) -> dict[str, tuple[int, int]]:
    """Wrap every nn.Linear but the output embedding; returns their (in, out) by path."""
    output_embedding = model.get_output_embeddings()
    chosen = [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not output_embedding
    ]
    shapes = {}
    for path, linear in chosen:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, LoraLinear(linear, path, current))
        shapes[path] = (linear.in_features, linear.out_features)
    return shapes


class EagerSlots:
    """The eager runner's adapter slots: a (weak) reference to the adapter each slot holds,
    read by the wrapped layers at each forward."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        # Weak: an idle slot never keeps an unloaded or evicted adapter's memory alive.
        self._adapter: list[weakref.ref | None] = [None] * num_slots

    def check(self, adapter: FlatAdapter) -> str | None:
        return None  # any rank: the wrapped layers multiply by the adapter's own tensors

    def write(self, slot: int, adapter: FlatAdapter) -> None:
        self._adapter[slot] = weakref.ref(adapter)

    def adapter_in(self, slot: int) -> FlatAdapter | None:
        ref = self._adapter[slot] if slot >= 0 else None
        return None if ref is None else ref()


class EagerRunner(ModelRunner):
    kind = "transformers"
    prefix_caching = False  # its KV lives in per-sequence caches, not the shared blocks
    plans_ahead = False  # its forwards take their input tokens from the host

    def __init__(self, model_id: str, hf_model, tok, config) -> None:
        super().__init__(model_id, hf_model, tok, config)
        model_config = hf_model.config
        self.model = hf_model
        self._current: list = [None]
        self._shapes = wrap_linears(hf_model, self._current)
        self.adapters = EagerSlots(config.max_loras)
        self.block_size = config.block_size
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        per_block = block_bytes(
            model_config.num_hidden_layers, self.block_size, kv_heads, head_dim, self.dtype
        )
        self.num_blocks = kv_capacity_blocks(config, self.device, per_block, self.max_total_tokens)
        self._caches: dict[int, object] = {}

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    @torch.inference_mode()
    def _forward(self, seq_id: int, ids: Sequence[int], start: int, slot: int) -> torch.Tensor:
        from transformers import DynamicCache

        cache = self._caches.get(seq_id)
        if cache is None or start == 0:  # from the start: also a preempted sequence's recompute
            cache = self._caches[seq_id] = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([list(ids)], device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device)[None, :]
        self._current[0] = self.adapters.adapter_in(slot)
        try:
            out = self.model(
                input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True
            )
        finally:
            self._current[0] = None
        return out.logits[0].float()  # (len, vocab)

    def prefill(self, chunks: Sequence[PrefillChunk], previous=None):
        last, scores = [], []
        for c in chunks:
            logits = self._forward(c.seq_id, c.token_ids, c.start, c.slot)
            if c.last:
                last.append(logits[-1:])
            score: list[float] = []
            if c.score:
                targets = list(c.token_ids[1:]) + (
                    [c.next_token] if c.next_token is not None else []
                )
                logprobs = torch.log_softmax(logits[: len(targets)], dim=-1)
                score = logprobs.gather(1, torch.tensor(targets, device=self.device)[:, None])
                score = score.squeeze(1).tolist()
            scores.append(score)
        return (torch.cat(last) if last else None), scores

    def decode(self, rows: Sequence[DecodeRow], previous=None) -> torch.Tensor:
        return torch.cat([self._forward(r.seq_id, [r.token_id], r.position, r.slot) for r in rows])

    def release(self, seq_id: int) -> None:
        self._caches.pop(seq_id, None)
