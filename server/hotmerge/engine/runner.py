"""The runner: the model on the device, its KV cache and adapter pool, one call per phase.

Llama-family models (Llama, Mistral, Qwen2, Qwen3) run through our own forward
(:class:`LlamaRunner`: paged KV cache, prefill and decode replayed from CUDA graphs, per padded
token count and batch size); any other architecture through transformers, eagerly
(:class:`~hotmerge.engine.models.hf_eager.EagerRunner`), behind the same interface
(:class:`ModelRunner`); ``loader.py`` picks one. Only the engine's worker thread calls
``prefill``/``decode`` and writes adapters into slots.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import torch
from hotmerge_kernels.layout import FlatAdapter

from hotmerge.engine.batch import (
    DecodeBuffers,
    DecodeRow,
    PrefillBuffers,
    PrefillChunk,
    padded_sizes,
)
from hotmerge.engine.config import FALLBACK_CONTEXT_TOKENS, EngineConfig
from hotmerge.engine.kv_cache import allocate_kv, block_bytes, blocks_for
from hotmerge.engine.lora import AdapterPool, LoraBatch
from hotmerge.engine.models.llama import (
    AttentionBatch,
    LlamaModel,
    module_paths,
)
from hotmerge.engine.quantized_base import log_quantized
from hotmerge.engine.sampling import RowSampling, Sampler
from hotmerge.errors import InvalidArgument

log = logging.getLogger(__name__)

_SCORE_ROWS = 256  # prompt positions scored at once (bounds the (rows, vocab) logits)


class AdapterSlots(Protocol):
    """The runner's adapter slots on the device; the scheduler decides what goes where."""

    num_slots: int

    def check(self, adapter: FlatAdapter) -> str | None:
        """Why ``adapter`` cannot go into a slot (None: it can)."""

    def write(self, slot: int, adapter: FlatAdapter) -> None:
        """Put ``adapter`` into ``slot`` (the next forward reading the slot uses it)."""


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
    adapters: AdapterSlots
    num_blocks: int
    block_size: int
    prefix_caching = True  # its KV lives in the shared blocks: a sequence may start on cached ones
    # Its forwards take input tokens still on the device (``previous``): a step can be planned
    # and launched before the step in flight has brought its tokens to the host.
    plans_ahead = True
    kind: str  # "llama" (our forward) or "transformers" (eager fallback)

    def __init__(self, model_id: str, hf_model, tok: Tokenizer, config: EngineConfig) -> None:
        """What both kinds take from the loaded model and its tokenizer."""
        model_config = hf_model.config
        self.model_id = model_id
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        self._tok = tok
        self.tokenizer = tok.tokenizer
        self.eos_token_ids = tok.eos_token_ids
        self.pad_token_id = tok.pad_token_id
        self.max_position_embeddings = getattr(model_config, "max_position_embeddings", None)
        self.vocab_size: int = model_config.vocab_size
        self.config = config
        self.max_total_tokens = (
            config.max_total_tokens or self.max_position_embeddings or FALLBACK_CONTEXT_TOKENS
        )
        # A step samples <= a batch. Two, used in turn: a step launched ahead samples into one
        # while the host still reads the step before from the other.
        self._samplers = [Sampler(config.max_batch_size, self.device) for _ in range(2)]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def prefill(self, chunks: Sequence[PrefillChunk], previous: torch.Tensor | None = None):
        """Run the chunks; returns (logits of the last position of every ``last`` chunk, in
        order, and per chunk the scored logprobs: one per token after the chunk's first, plus
        ``next_token``'s when given). ``previous``: the in-flight step's sampled tokens on the
        device, for chunks whose token is one of them (``prev``)."""
        raise NotImplementedError

    def decode(
        self, rows: Sequence[DecodeRow], previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One token per row; returns the next-token logits (rows, vocab) float32.
        ``previous`` as for ``prefill``."""
        raise NotImplementedError

    @torch.inference_mode()
    def sample(
        self,
        logits: Sequence[torch.Tensor],
        rows: Sequence[RowSampling],
        previous: torch.Tensor | None = None,
    ) -> Sampler:
        """Queue sampling for the rows of the concatenated logits; ``.wait()`` on the result
        gives their tokens and logprobs (the step's one host sync), ``.tokens`` the tokens on
        the device. The result stays valid until the next launch but one. ``previous``: the
        in-flight step's sampled tokens (a penalised row's seen token still on the device)."""
        parts = [t for t in logits if t is not None and t.shape[0]]
        sampler = self._samplers[0]
        self._samplers.reverse()
        joined = torch.cat(parts) if len(parts) > 1 else next(iter(parts), None)
        sampler.launch(joined, rows, previous)
        return sampler

    def release(self, seq_id: int) -> None:
        """A sequence ended (the eager runner drops its cache; the paged one has nothing to do)."""


def kv_capacity_blocks(
    config: EngineConfig, device: torch.device, per_block: int, max_total: int
) -> int:
    """How many KV blocks to allocate (the null block included)."""
    if config.kv_cache_tokens is not None:
        return blocks_for(config.kv_cache_tokens, config.block_size) + 1
    if device.type != "cuda":  # room for a full batch of the longest requests
        return blocks_for(config.max_batch_size * max_total, config.block_size) + 1
    free, _ = torch.cuda.mem_get_info(device)
    headroom = 2 * 1024**3  # activations, logits, graph pools
    usable = (free - config.reserved_bytes - headroom) * config.kv_cache_fraction
    blocks = int(usable // per_block)
    if blocks < blocks_for(max_total, config.block_size) + 1:
        raise InvalidArgument(
            f"the KV cache fits {max(blocks, 0)} blocks of {config.block_size} tokens, less than "
            f"one request of max_total_tokens={max_total}: free device memory, lower the "
            "adapter/merge budgets or max_total_tokens, or raise --kv-cache-fraction"
        )
    return blocks


class LlamaRunner(ModelRunner):
    kind = "llama"

    def __init__(self, model_id: str, hf_model, tok: Tokenizer, config: EngineConfig) -> None:
        super().__init__(model_id, hf_model, tok, config)
        model_config = hf_model.config
        self._paths = module_paths(hf_model)
        self._shapes = {}
        lora_shapes = None
        with torch.inference_mode():
            try:
                self.model = LlamaModel(hf_model, config.quantize)
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
            num_slots=config.max_loras,
            max_rank=config.max_lora_rank,
            dtype=self.dtype,
            device=self.device,
        )
        self.block_size = config.block_size
        per_block = block_bytes(
            num_layers, self.block_size, self.model.num_kv_heads, self.model.head_dim, self.dtype
        )
        self.num_blocks = kv_capacity_blocks(config, self.device, per_block, self.max_total_tokens)
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
        self.buffers = DecodeBuffers(config.max_batch_size, self.max_blocks, self.device)
        self.sizes = padded_sizes(config.max_batch_size)
        # (padded batch size, whether any row has an adapter) -> (graph, its logits output)
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # A prefill never holds more tokens than all its sequences can.
        max_prefill = min(config.max_prefill_tokens, config.max_batch_size * self.max_total_tokens)
        self.prefill_buffers = PrefillBuffers(
            max_prefill, config.max_batch_size, self.max_blocks, self.device
        )
        # Midpoints from 128: a mixed step of 32 decode rows and a 128-token prompt pads to 192
        # tokens, not 256 (its projections' GEMMs are about compute-bound there).
        self.prefill_sizes = padded_sizes(
            max_prefill, smallest=min(16, max_prefill), midpoints_from=128
        )
        # (padded token count, whether any token has an adapter, whether it starts with rows)
        # -> (graph, (hidden, logits))
        self._prefill_graphs: dict[tuple[int, bool, bool], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.attention = None  # the paged decode attention kernel, with its workspace (CUDA)
        if self.device.type == "cuda":
            from hotmerge_kernels.ops.paged_attention import PagedAttention

            self.attention = PagedAttention(
                config.max_batch_size,
                model_config.num_attention_heads,
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
            config.max_loras,
            config.max_lora_rank,
            self.adapters.nbytes / 2**30,
        )
        if config.quantize is not None:
            log_quantized(self.model, config, per_block, self.device)
        if self.device.type == "cuda":
            self._warm_up(capture=config.cuda_graphs)

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
        """About four prompts (at most the sequences a prefill takes) of ``size`` tokens in all,
        each fitting one sequence, each with its own adapter slot: a prefill of that padded size
        with LoRA on every token."""
        count = min(4, self.prefill_buffers.max_seqs)
        per = max(1, min(self.max_total_tokens, -(-size // count)))
        lengths = [per] * (size // per) + ([size % per] if size % per else [])
        table = [0] * self.max_blocks  # the null block: warm-up output is never read
        slots = self.adapters.num_slots
        return [PrefillChunk(-1, [0] * n, 0, table, i % slots, True) for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def _warm_up(self, *, capture: bool) -> None:
        """Run every shape once (the kernels autotune per shape, outside any graph), then
        capture a decode graph per padded batch size and a prefill graph per padded token count
        (each with and without LoRA launches; prefill also with and without rows in front), all
        sharing one memory pool."""
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
            for with_lora, with_rows in itertools.product((True, False), repeat=2):
                step = functools.partial(self._prefill_step, size, seqs, with_lora, with_rows)
                self._prefill_graphs[size, with_lora, with_rows] = self._capture(pool, step)
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
    def decode(self, rows: Sequence[DecodeRow], previous=None) -> torch.Tensor:
        n = len(rows)
        # On CUDA, graphs or not, the batch is padded to the same sizes, so that eager and
        # replayed decode run the very same kernels (and give the same tokens).
        size = next(s for s in self.sizes if s >= n) if self.device.type == "cuda" else n
        with_lora = any(r.slot >= 0 for r in rows)
        self.buffers.fill(rows, size, self.block_size, previous)
        captured = self._graphs.get((size, with_lora))
        if captured is not None:
            graph, logits = captured
            graph.replay()
            return logits[:n]
        return self._decode_step(size, with_lora)[:n]

    # -- prefill ------------------------------------------------------------------------------

    def _prefill_step(self, size: int, seqs: int, with_lora: bool, with_rows: bool):
        """The forward over the prefill buffers' first ``size`` tokens and ``seqs`` sequences:
        (final hidden states (size, H), logits of each sequence's last token (seqs, V)).
        ``with_rows``: the first ``seqs`` tokens may be rows (``PrefillBuffers.rows``), attended
        by the decode kernel (rows of length 0 past them: it does nothing there)."""
        buf = self.prefill_buffers
        attn = AttentionBatch(
            positions=buf.positions[:size],
            slot_mapping=buf.slot_mapping[:size],
            block_tables=buf.block_tables[:seqs],
            query_start=buf.query_start[:seqs],
            query_lens=buf.query_lens[:seqs],
            query_pos=buf.query_pos[:seqs],
            row_lens=buf.row_lens[:seqs] if with_rows else None,
            kernel=self.attention,
        )
        lora = LoraBatch(self.adapters, buf.lora_slots[:size]) if with_lora else None
        hidden = self.model(buf.input_ids[:size], attn, self.kv, lora)
        return hidden, self.model.logits(hidden.index_select(0, buf.last[:seqs]))

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[PrefillChunk], previous=None):
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
        seqs = buf.fill(chunks, size, self.block_size, previous)
        with_lora = any(c.slot >= 0 for c in chunks)  # base-model prompts: no LoRA launches
        with_rows = buf.rows > 0
        captured = self._prefill_graphs.get((size, with_lora, with_rows))
        if captured is not None:
            graph, (hidden, logits) = captured
            graph.replay()
        else:
            hidden, logits = self._prefill_step(size, seqs, with_lora, with_rows)
        last = [i for i, c in enumerate(chunks) if c.last]
        if len(last) < len(chunks):
            logits = logits.index_select(0, buf.sampled[: len(last)]) if last else None
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
