"""The runner: the model on the device, its KV cache and adapter pool, one call per phase.

``load_runner`` loads the tokenizer and the transformers model, then runs Llama-family models
(Llama, Mistral, Qwen2, Qwen3) through our own forward (:class:`LlamaRunner`: paged KV cache,
prefill and decode replayed from CUDA graphs, per padded token count and batch size) and any other
architecture through transformers, eagerly (:class:`~hotmerge.engine.models.hf_eager.EagerRunner`),
behind the same interface. Only the scheduler's worker thread calls ``prefill``/``decode``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hotmerge.engine.batch import (
    DecodeBuffers,
    DecodeRow,
    PrefillBuffers,
    PrefillChunk,
    padded_sizes,
)
from hotmerge.engine.kv_cache import allocate_kv, block_bytes, blocks_for
from hotmerge.engine.lora import AdapterPool, LoraBatch, SlotTable
from hotmerge.engine.models.llama import (
    AttentionBatch,
    LlamaModel,
    module_paths,
    unsupported_reason,
)
from hotmerge.engine.quantized_base import log_quantized, refuse_prequantized
from hotmerge.engine.sampling import RowSampling, Sampler
from hotmerge.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_SCORE_ROWS = 256  # prompt positions scored at once (bounds the (rows, vocab) logits)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise InvalidArgument(
            f"dtype: unknown {dtype!r}; use one of float32, float16, bfloat16"
        ) from None


@dataclass
class EngineLimits:
    """Sizes the runner is built for (from the server config)."""

    max_batch_size: int = 8
    max_total_tokens: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    kv_cache_fraction: float = 0.9  # of the device memory free after weights and budgets
    kv_cache_tokens: int | None = None  # an exact capacity instead (tests, CPU)
    reserved_bytes: int = 0  # device memory kept for adapters and merges (their budgets)
    max_loras: int = 16  # adapter slots
    max_lora_rank: int = 64
    max_prefill_tokens: int = 2048  # prompt tokens one step may prefill
    cuda_graphs: bool = True
    quantize: str | None = None  # the base's projections: nf4, int4, int8, fp8 (None: as loaded)


class Tokenizer:
    """The model's tokenizer, safe to call from request threads while the worker decodes."""

    def __init__(self, tokenizer, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_ids)
        # A fast tokenizer may reconfigure itself (a mutable borrow in Rust) on its first
        # call; do that now, before request threads encode while the worker decodes.
        self._lock = threading.Lock()
        self.encode("warm-up")
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else min(self.eos_token_ids, default=0)

    def encode(self, text: str) -> list[int]:
        """Prompt token ids, special tokens (BOS) added as the model's tokenizer does."""
        with self._lock:
            return list(self.tokenizer(text)["input_ids"])


class ModelRunner:
    """What the scheduler needs of a runner; both kinds fill it in."""

    model_id: str
    device: torch.device
    dtype: torch.dtype
    tokenizer: object  # the transformers tokenizer
    eos_token_ids: frozenset[int]
    pad_token_id: int
    max_position_embeddings: int | None
    adapters: SlotTable
    num_blocks: int
    block_size: int
    kind: str  # "llama" (our forward) or "transformers" (eager fallback)

    def __init__(self, model_id: str, hf_model, tok: Tokenizer, limits: EngineLimits) -> None:
        """What both kinds take from the loaded model and its tokenizer."""
        config = hf_model.config
        self.model_id = model_id
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        self._tok = tok
        self.tokenizer = tok.tokenizer
        self.eos_token_ids = tok.eos_token_ids
        self.pad_token_id = tok.pad_token_id
        self.max_position_embeddings = getattr(config, "max_position_embeddings", None)
        self.vocab_size: int = config.vocab_size
        self.limits = limits
        self.max_total_tokens = limits.max_total_tokens or self.max_position_embeddings or 4096
        self.sampler = Sampler(limits.max_batch_size, self.device)  # a step samples <= a batch

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def prefill(self, chunks: Sequence[PrefillChunk]):
        """Run the chunks; returns (logits of the last position of every ``last`` chunk, in
        order, and per chunk the scored logprobs: one per token after the chunk's first, plus
        ``next_token``'s when given)."""
        raise NotImplementedError

    def decode(self, rows: Sequence[DecodeRow]) -> torch.Tensor:
        """One token per row; returns the next-token logits (rows, vocab) float32."""
        raise NotImplementedError

    @torch.inference_mode()
    def sample(self, logits: Sequence[torch.Tensor], rows: Sequence[RowSampling]) -> Sampler:
        """Queue sampling for the rows of the concatenated logits; ``.wait()`` on the result
        gives their tokens and logprobs (the step's one host sync)."""
        parts = [t for t in logits if t is not None and t.shape[0]]
        self.sampler.launch(torch.cat(parts) if len(parts) > 1 else next(iter(parts), None), rows)
        return self.sampler

    def release(self, seq_id: int) -> None:
        """A sequence ended (the eager runner drops its cache; the paged one has nothing to do)."""


def load_runner(
    model_id_or_path: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    allow_hub: bool = False,
    limits: EngineLimits | None = None,
    eager: bool = False,
) -> ModelRunner:
    """Load tokenizer and model; our forward for Llama-family models, transformers otherwise
    (or when ``eager``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    limits = limits or EngineLimits()
    model_id = str(model_id_or_path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    local = Path(model_id).is_dir()
    if not local and not allow_hub:
        raise NotFound(
            f"model {model_id!r}: no such directory (hub downloads are off; "
            "enable them to fetch from the Hugging Face Hub)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=local)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # transformers' many ways
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgument(
            f"model {model_id!r}: no usable tokenizer ({reason[:200]}); save the "
            "tokenizer with the model (tokenizer.json, tokenizer_config.json)"
        ) from None
    refuse_prequantized(model_id, local)
    model = AutoModelForCausalLM.from_pretrained(
        model_id, dtype=torch_dtype, local_files_only=local
    )
    return build_runner(model_id, model.to(dev), tokenizer, limits, eager=eager)


def build_runner(
    model_id: str, model, tokenizer, limits: EngineLimits, *, eager: bool = False
) -> ModelRunner:
    """A runner over an already loaded transformers model (on its device and dtype)."""
    model = model.eval().requires_grad_(False)
    tok = Tokenizer(tokenizer, _eos_ids(model, tokenizer))
    reason = "the eager path was asked for" if eager else unsupported_reason(model)
    if reason is None:
        return LlamaRunner(model_id, model, tok, limits)
    if limits.quantize is not None:
        raise InvalidArgument(f"quantize: needs hotmerge's Llama-family forward, but {reason}")
    from hotmerge.engine.models.hf_eager import EagerRunner

    log.warning("model %s runs through transformers, eagerly: %s", model_id, reason)
    return EagerRunner(model_id, model, tok, limits)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_config = getattr(model, "generation_config", None)
    for source in (getattr(gen_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return ids


def kv_capacity_blocks(
    limits: EngineLimits, device: torch.device, per_block: int, max_total: int
) -> int:
    """How many KV blocks to allocate (the null block included)."""
    if limits.kv_cache_tokens is not None:
        return blocks_for(limits.kv_cache_tokens, limits.block_size) + 1
    if device.type != "cuda":  # room for a full batch of the longest requests
        return blocks_for(limits.max_batch_size * max_total, limits.block_size) + 1
    free, _ = torch.cuda.mem_get_info(device)
    headroom = 2 * 1024**3  # activations, logits, graph pools
    usable = (free - limits.reserved_bytes - headroom) * limits.kv_cache_fraction
    blocks = int(usable // per_block)
    if blocks < blocks_for(max_total, limits.block_size) + 1:
        raise InvalidArgument(
            f"the KV cache fits {max(blocks, 0)} blocks of {limits.block_size} tokens, less than "
            f"one request of max_total_tokens={max_total}: free device memory, lower the "
            "adapter/merge budgets or max_total_tokens, or raise --kv-cache-fraction"
        )
    return blocks


class LlamaRunner(ModelRunner):
    kind = "llama"

    def __init__(self, model_id: str, hf_model, tok: Tokenizer, limits: EngineLimits) -> None:
        super().__init__(model_id, hf_model, tok, limits)
        config = hf_model.config
        self._paths = module_paths(hf_model)
        self._shapes = {}
        lora_shapes = None
        with torch.inference_mode():
            try:
                self.model = LlamaModel(hf_model, limits.quantize)
            except ValueError as exc:  # a format's shape rule (e.g. int4: K % 128)
                raise InvalidArgument(f"quantize: {exc}") from None
            lora_shapes = self.model.lora_shapes
        for path, (group, name, _) in self._paths.items():
            self._shapes[path] = lora_shapes[group][name]
        del hf_model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        num_layers = len(self.model.layers)
        self.adapters = AdapterPool(
            lora_shapes,
            self._paths,
            num_layers=num_layers,
            num_slots=limits.max_loras,
            max_rank=limits.max_lora_rank,
            dtype=self.dtype,
            device=self.device,
        )
        self.block_size = limits.block_size
        per_block = block_bytes(
            num_layers, self.block_size, self.model.num_kv_heads, self.model.head_dim, self.dtype
        )
        self.num_blocks = kv_capacity_blocks(limits, self.device, per_block, self.max_total_tokens)
        self.kv = allocate_kv(
            num_layers,
            self.num_blocks,
            self.block_size,
            self.model.num_kv_heads,
            self.model.head_dim,
            self.dtype,
            self.device,
        )
        self.max_blocks = blocks_for(self.max_total_tokens, self.block_size)
        self.buffers = DecodeBuffers(limits.max_batch_size, self.max_blocks, self.device)
        self.sizes = padded_sizes(limits.max_batch_size)
        # (padded batch size, whether any row has an adapter) -> (graph, its logits output)
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # A prefill never holds more tokens than all its sequences can.
        max_prefill = min(limits.max_prefill_tokens, limits.max_batch_size * self.max_total_tokens)
        self.prefill_buffers = PrefillBuffers(
            max_prefill, limits.max_batch_size, self.max_blocks, self.device
        )
        self.prefill_sizes = padded_sizes(max_prefill, smallest=min(16, max_prefill))
        # (padded token count, whether any token has an adapter) -> (graph, (hidden, logits))
        self._prefill_graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.attention = None  # the paged decode attention kernel, with its workspace (CUDA)
        if self.device.type == "cuda":
            from hotmerge_kernels.ops.paged_attention import PagedAttention

            self.attention = PagedAttention(
                limits.max_batch_size,
                config.num_attention_heads,
                self.model.head_dim,
                self.max_blocks,
                self.block_size,
                self.device,
            )
        log.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB); adapter pool: %d slots of "
            "rank <= %d (%.2f GiB)",
            self.num_blocks - 1,
            self.block_size,
            (self.num_blocks - 1) * self.block_size,
            self.num_blocks * per_block / 2**30,
            limits.max_loras,
            limits.max_lora_rank,
            self.adapters.nbytes / 2**30,
        )
        if limits.quantize is not None:
            log_quantized(self.model, limits, per_block, self.device)
        if self.device.type == "cuda":
            self._warm_up(capture=limits.cuda_graphs)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    # -- decode -------------------------------------------------------------------------------

    def _decode_step(self, size: int, with_lora: bool = True) -> torch.Tensor:
        buf = self.buffers
        attn = AttentionBatch(
            positions=buf.positions[:size],
            slot_mapping=buf.slot_mapping[:size],
            block_tables=buf.block_tables[:size],
            seq_lens=buf.seq_lens[:size],
            kernel=self.attention,
        )
        lora = LoraBatch(self.adapters, buf.lora_slots[:size]) if with_lora else None
        hidden = self.model(buf.input_ids[:size], attn, self.kv, lora)
        return self.model.logits(hidden)

    def _warm_chunks(self, size: int) -> list[PrefillChunk]:
        """About four prompts of ``size`` tokens in all, each fitting one sequence, each with
        its own adapter slot: a prefill of that padded size with LoRA on every token."""
        per = max(1, min(self.max_total_tokens, -(-size // 4)))
        lengths = [per] * (size // per) + ([size % per] if size % per else [])
        table = [0] * self.max_blocks  # the null block: warm-up output is never read
        slots = self.adapters.num_slots
        return [PrefillChunk(-1, [0] * n, 0, table, i % slots, True) for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def _warm_up(self, *, capture: bool) -> None:
        """Run every shape once (the kernels autotune per shape, outside any graph), then
        capture one decode graph per padded batch size and one prefill graph per padded token
        count, all sharing one memory pool."""
        started = time.perf_counter()
        slots = self.adapters.num_slots
        with self.adapters.every_slot_full():
            for size in self.sizes:
                rows = [DecodeRow(-1, 0, 0, [0], i % slots) for i in range(size)]
                self.buffers.fill(rows, size, self.block_size)
                self._decode_step(size)
            for size in self.prefill_sizes:
                self.prefill(self._warm_chunks(size))
        torch.cuda.synchronize()
        log.info("kernels warmed up in %.1f s", time.perf_counter() - started)
        if not capture:
            return
        # A batch of base-model rows only replays a graph without the LoRA launches.
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: smaller ones reuse its pool memory
            self.buffers.fill([], size, self.block_size)
            for with_lora in (True, False):
                step = functools.partial(self._decode_step, size, with_lora)
                self._graphs[size, with_lora] = self._capture(pool, step)
        for size in reversed(self.prefill_sizes):
            seqs = self.prefill_buffers.fill([], size, self.block_size)
            for with_lora in (True, False):
                step = functools.partial(self._prefill_step, size, seqs, with_lora)
                self._prefill_graphs[size, with_lora] = self._capture(pool, step)
        torch.cuda.synchronize()
        log.info(
            "captured CUDA graphs in %.1f s: decode for batch sizes %s, prefill for token "
            "counts %s",
            time.perf_counter() - started,
            self.sizes,
            self.prefill_sizes,
        )

    @staticmethod
    def _capture(pool, step):
        """(graph, outputs) of ``step`` captured once it has run eagerly."""
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = step()
        return graph, outputs

    @torch.inference_mode()
    def decode(self, rows: Sequence[DecodeRow]) -> torch.Tensor:
        n = len(rows)
        # On CUDA, graphs or not, the batch is padded to the same sizes, so that eager and
        # replayed decode run the very same kernels (and give the same tokens).
        size = next(s for s in self.sizes if s >= n) if self.device.type == "cuda" else n
        with_lora = any(r.slot >= 0 for r in rows)
        self.buffers.fill(rows, size, self.block_size)
        captured = self._graphs.get((size, with_lora))
        if captured is not None:
            graph, logits = captured
            graph.replay()
            return logits[:n]
        return self._decode_step(size, with_lora)[:n]

    # -- prefill ------------------------------------------------------------------------------

    def _prefill_step(self, size: int, seqs: int, with_lora: bool):
        """The forward over the prefill buffers' first ``size`` tokens and ``seqs`` sequences:
        (final hidden states (size, H), logits of each sequence's last token (seqs, V))."""
        buf = self.prefill_buffers
        attn = AttentionBatch(
            positions=buf.positions[:size],
            slot_mapping=buf.slot_mapping[:size],
            block_tables=buf.block_tables[:seqs],
            query_start=buf.query_start[:seqs],
            query_lens=buf.query_lens[:seqs],
            query_pos=buf.query_pos[:seqs],
        )
        lora = LoraBatch(self.adapters, buf.lora_slots[:size]) if with_lora else None
        hidden = self.model(buf.input_ids[:size], attn, self.kv, lora)
        return hidden, self.model.logits(hidden.index_select(0, buf.last[:seqs]))

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[PrefillChunk]):
        n = sum(len(c.token_ids) for c in chunks)
        buf = self.prefill_buffers
        if n > buf.max_tokens or len(chunks) > buf.max_seqs:
            raise ValueError(
                f"a prefill of {n} tokens in {len(chunks)} chunks; this runner takes at most "
                f"{buf.max_tokens} tokens in {buf.max_seqs} chunks"
            )
        # On CUDA, graphs or not, the tokens are padded to the same sizes, so that eager and
        # replayed prefill run the very same kernels.
        size = next(s for s in self.prefill_sizes if s >= n) if self.device.type == "cuda" else n
        seqs = buf.fill(chunks, size, self.block_size)
        with_lora = any(c.slot >= 0 for c in chunks)  # base-model prompts: no LoRA launches
        captured = self._prefill_graphs.get((size, with_lora))
        if captured is not None:
            graph, (hidden, logits) = captured
            graph.replay()
        else:
            hidden, logits = self._prefill_step(size, seqs, with_lora)
        last = [i for i, c in enumerate(chunks) if c.last]
        if len(last) < len(chunks):
            logits = logits[torch.tensor(last, device=self.device)] if last else None
        else:
            logits = logits[: len(chunks)]
        scores, first = [], 0
        for c in chunks:
            end = first + len(c.token_ids)
            scores.append(self._score(hidden[first:end], c) if c.score else [])
            first = end
        return logits, scores

    def _score(self, hidden: torch.Tensor, chunk: PrefillChunk) -> list[float]:
        """Logprob of each next prompt token given the ones before it, over this chunk."""
        targets = list(chunk.token_ids[1:])
        if chunk.next_token is not None:
            targets.append(chunk.next_token)
        out: list[float] = []
        for lo in range(0, len(targets), _SCORE_ROWS):
            part = targets[lo : lo + _SCORE_ROWS]
            logprobs = torch.log_softmax(self.model.logits(hidden[lo : lo + len(part)]), dim=-1)
            index = torch.tensor(part, device=self.device)[:, None]
            out.extend(logprobs.gather(1, index).squeeze(1).tolist())
        return out
