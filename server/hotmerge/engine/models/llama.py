"""Our own Llama-family forward (Llama, Mistral, Qwen2, Qwen3), gpt-fast style.

The weights are taken from a loaded transformers model (so hub ids, local folders and dtypes
load as transformers loads them): q/k/v fused into one matrix, gate/up into another, biases
where the config has them, Qwen3's per-head q/k norms, RoPE from the model's own rotary module
(every static RoPE variant: default, linear, llama3, yarn, ...), GQA, and a sliding window on
the layers the config gives one.

One forward serves both phases over a flat batch of tokens; only attention differs (the runner
captures both in CUDA graphs, per padded size):
- decode: one token per row, paged attention over that row's block table;
- prefill: each sequence's chunk attends to its cached prefix and itself, through the same
  paged cache (its own K/V are written first), one launch for every sequence.
LoRA is added to each projection group from the adapter pool's stacked slots, by each token's
slot index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hotmerge_kernels.quant import QuantizedWeight, quantize
from hotmerge_kernels.quant.formats import stack_rows
from torch import nn

from hotmerge.engine import ops
from hotmerge.engine.lora import AdapterPool, LoraBatch

log = logging.getLogger(__name__)

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
# The projections LoRA adapters target, by group: (group, [(module name, output width key)]).
ATTN_PROJ = ("q_proj", "k_proj", "v_proj")
MLP_PROJ = ("gate_proj", "up_proj")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why our forward cannot run this model (None: it can)."""
    config = model.config
    if config.model_type not in SUPPORTED:
        return f"architecture {config.model_type!r} is not one of {sorted(SUPPORTED)}"
    rope = getattr(model.model, "rotary_emb", None)
    if rope is None or getattr(rope, "rope_type", "default") in ("dynamic", "longrope"):
        return "its RoPE depends on the sequence length (dynamic/longrope scaling)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (only silu)"
    return None


@dataclass
class AttentionBatch:
    """Where each token's K/V goes and what it attends to (device tensors only, so a forward
    can be captured in a CUDA graph).

    Decode (one token per row): ``block_tables (B, max_blocks)``, ``seq_lens (B,)`` tokens in
    the cache including the new one. Prefill (chunks of prompts, flat): per sequence
    ``block_tables (S, max_blocks)``, ``query_start``, ``query_lens`` and ``query_pos`` (its
    first token's index in the batch, its token count, its first token's position); see
    ``hotmerge_kernels.prefill_attention``. A prefill whose first tokens are rows (a mixed
    step's decode rows, ``batch.leading_rows``) also has ``row_lens (R,)``: rows ``0 .. R-1``
    (tokens and sequences alike) go through the decode attention with these lengths (0: not a
    row), and their ``query_lens`` are 0.
    """

    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64 flat cache slot, -1: do not write
    block_tables: torch.Tensor
    seq_lens: torch.Tensor | None = None
    query_start: torch.Tensor | None = None
    query_lens: torch.Tensor | None = None
    query_pos: torch.Tensor | None = None
    row_lens: torch.Tensor | None = None
    kernel: object | None = None  # the runner's PagedAttention (decode and rows, on CUDA)

    @property
    def is_decode(self) -> bool:
        return self.query_lens is None


class LlamaLayer(nn.Module):
    def __init__(
        self, hf_layer: nn.Module, config, index: int, window: int, quant: str | None = None
    ) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.index = index
        self.window = window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = attn.q_proj.out_features // self.num_heads
        self.scale = attn.scaling if hasattr(attn, "scaling") else self.head_dim**-0.5
        projs = [getattr(attn, n) for n in ATTN_PROJ]
        self.qkv_weight = _base_weight(projs, quant)
        biases = [p.bias for p in projs]
        self.qkv_bias = (
            nn.Parameter(torch.cat(biases), requires_grad=False)
            if all(b is not None for b in biases)
            else None
        )
        self.qkv_offsets = _offsets([p.out_features for p in projs])
        self.o_weight = _base_weight([attn.o_proj], quant)
        self.o_bias = attn.o_proj.bias
        self.gate_up_weight = _base_weight([mlp.gate_proj, mlp.up_proj], quant)
        self.intermediate = mlp.gate_proj.out_features
        self.down_weight = _base_weight([mlp.down_proj], quant)
        # The originals that were copied (concatenated or quantized) go now, so the KV cache,
        # sized after this, gets their room (~9 GB of q/k/v and gate/up at 7B in bf16): the
        # transformers model is consumed.
        copied = (*projs, mlp.gate_proj, mlp.up_proj)
        if quant is not None:
            copied += (attn.o_proj, mlp.down_proj)
        for proj in copied:
            proj.weight = None
        self.input_norm = hf_layer.input_layernorm
        self.post_norm = hf_layer.post_attention_layernorm
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3
        self.k_norm = getattr(attn, "k_norm", None)

    def forward(self, hidden, residual, attn: AttentionBatch, kv, rope, lora: LoraBatch | None):
        if residual is None:
            residual = hidden
            h = ops.rms_norm(hidden, self.input_norm.weight, self.input_norm.variance_epsilon)
        else:
            h, residual = ops.rms_norm(
                hidden, self.input_norm.weight, self.input_norm.variance_epsilon, residual
            )
        qkv = ops.linear(h, self.qkv_weight, self.qkv_bias)
        if lora is not None:
            lora.apply(self.index, "qkv", h, qkv)
        q_end, k_end = self.qkv_offsets[1], self.qkv_offsets[2]
        tokens = h.shape[0]
        q = qkv[:, :q_end].view(tokens, self.num_heads, self.head_dim)
        k = qkv[:, q_end:k_end].view(tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, k_end:].view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = ops.rms_norm(q, self.q_norm.weight, self.q_norm.variance_epsilon)
            k = ops.rms_norm(k, self.k_norm.weight, self.k_norm.variance_epsilon)
        k_cache, v_cache = kv
        cos, sin = rope
        ops.rotary_and_cache(q, k, v, attn.positions, cos, sin, k_cache, v_cache, attn.slot_mapping)
        if attn.is_decode:
            out = ops.paged_decode_attention(
                q,
                k_cache,
                v_cache,
                attn.block_tables,
                attn.seq_lens,
                self.scale,
                self.window,
                attn.kernel,
            )
        else:
            out = torch.empty_like(q)
            if attn.row_lens is not None:
                rows = attn.row_lens.shape[0]
                ops.paged_decode_attention(
                    q[:rows],
                    k_cache,
                    v_cache,
                    attn.block_tables[:rows],
                    attn.row_lens,
                    self.scale,
                    self.window,
                    attn.kernel,
                    out=out[:rows],
                )
            ops.prefill_attention(
                q,
                k_cache,
                v_cache,
                attn.block_tables,
                attn.query_start,
                attn.query_lens,
                attn.query_pos,
                self.scale,
                self.window,
                out=out,
            )
        out = out.reshape(tokens, self.num_heads * self.head_dim)
        o = ops.linear(out, self.o_weight, self.o_bias)
        if lora is not None:
            lora.apply(self.index, "o", out, o)
        h, residual = ops.rms_norm(
            o, self.post_norm.weight, self.post_norm.variance_epsilon, residual
        )
        gate_up = ops.linear(h, self.gate_up_weight)
        if lora is not None:
            lora.apply(self.index, "gate_up", h, gate_up)
        act = ops.silu_and_mul(gate_up)
        down = ops.linear(act, self.down_weight)
        if lora is not None:
            lora.apply(self.index, "down", act, down)
        return down, residual


class LlamaModel(nn.Module):
    """The whole network over a flat batch of tokens; returns hidden states (T, H).

    ``quant`` (one of ``hotmerge_kernels.quant.FORMATS``) quantizes the base's projections
    (q/k/v/o, gate/up/down) as they are taken; embeddings, norms and lm_head stay 16-bit.
    """

    def __init__(self, hf_model: nn.Module, quant: str | None = None) -> None:
        super().__init__()
        reason = unsupported_reason(hf_model)
        if reason is not None:
            raise ValueError(reason)
        config = hf_model.config
        inner = hf_model.model
        self.config = config
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.lm_head = hf_model.lm_head
        windows = layer_windows(config)
        self.quant = quant
        self.base_bytes_16bit = sum(  # the projections' bytes before quantization
            p.in_features * p.out_features * self.embed.weight.element_size()
            for layer in inner.layers
            for p in _projections(layer)
        )
        self.layers = nn.ModuleList(
            LlamaLayer(layer, config, i, windows[i], quant) for i, layer in enumerate(inner.layers)
        )
        first = self.layers[0]
        self.num_kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        self.lora_shapes = lora_shapes(hf_model)
        rope = inner.rotary_emb
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = positions[:, None] * rope.inv_freq.float().cpu()[None, :]
        device = first.input_norm.weight.device
        self.cos = (freqs.cos() * rope.attention_scaling).to(device)  # (P, D/2) fp32
        self.sin = (freqs.sin() * rope.attention_scaling).to(device)

    def forward(self, input_ids, attn: AttentionBatch, kv_caches, lora: LoraBatch | None):
        hidden = self.embed(input_ids)
        residual = None
        rope = (self.cos, self.sin)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, attn, kv, rope, lora)
        hidden, _ = ops.rms_norm(hidden, self.norm.weight, self.norm.variance_epsilon, residual)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head.weight).float()

    @property
    def base_bytes(self) -> int:
        """Device bytes of the projections as held (packed codes and scales when quantized)."""
        total = 0
        for layer in self.layers:
            for w in (layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.down_weight):
                total += (
                    w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
                )
        return total


def _base_weight(projs: list[nn.Linear], quant: str | None) -> nn.Parameter | QuantizedWeight:
    """The projections' weights stacked along their outputs: as a checkpoint saved them
    quantized (``quantized_base.load_bnb`` attaches them as ``stored_weight``), else 16-bit,
    quantized here when ``quant``."""
    loaded = [getattr(p, "stored_weight", None) for p in projs]
    if all(w is not None for w in loaded):
        return stack_rows(loaded)
    weight = torch.cat([p.weight for p in projs]) if len(projs) > 1 else projs[0].weight
    if quant is None:
        return nn.Parameter(weight, requires_grad=False)
    return quantize(weight.detach(), quant)


def _projections(hf_layer: nn.Module) -> list[nn.Linear]:
    attn, mlp = hf_layer.self_attn, hf_layer.mlp
    return [getattr(attn, n) for n in (*ATTN_PROJ, "o_proj")] + [
        getattr(mlp, n) for n in (*MLP_PROJ, "down_proj")
    ]


def layer_windows(config) -> list[int]:
    """Each layer's sliding window (0: full attention), from ``layer_types`` when given."""
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" else 0 for t in types]
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = 0
    return [window] * config.num_hidden_layers


def lora_shapes(hf_model: nn.Module) -> dict[str, dict[str, tuple[int, int]]]:
    """Per projection group, each target module's (in, out); the pool's geometry."""
    layer = hf_model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "qkv": {n: _io(getattr(attn, n)) for n in ATTN_PROJ},
        "o": {"o_proj": _io(attn.o_proj)},
        "gate_up": {n: _io(getattr(mlp, n)) for n in MLP_PROJ},
        "down": {"down_proj": _io(mlp.down_proj)},
    }


def module_paths(hf_model: nn.Module) -> dict[str, tuple[str, str, int]]:
    """``{module path: (group, module name, layer index)}`` for every LoRA target."""
    paths = {}
    for i in range(len(hf_model.model.layers)):
        for group, names in (
            ("qkv", ATTN_PROJ),
            ("o", ("o_proj",)),
            ("gate_up", MLP_PROJ),
            ("down", ("down_proj",)),
        ):
            parent = "self_attn" if group in ("qkv", "o") else "mlp"
            for name in names:
                paths[f"model.layers.{i}.{parent}.{name}"] = (group, name, i)
    return paths


def _io(linear: nn.Linear) -> tuple[int, int]:
    return linear.in_features, linear.out_features


def _offsets(widths: list[int]) -> tuple[int, ...]:
    out = [0]
    for w in widths:
        out.append(out[-1] + w)
    return tuple(out)


__all__ = ["AdapterPool", "AttentionBatch", "LlamaModel", "layer_windows", "unsupported_reason"]
