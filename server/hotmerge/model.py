"""The model runner: a transformers causal LM whose Linear layers carry per-row LoRA slots."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from hotmerge_kernels.layout import FlatAdapter

from hotmerge.errors import InvalidArgument, NotFound
from hotmerge.lora import AdapterSlots, LoraLinear, wrap_linears

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


class ModelRunner:
    """Loads the model and tokenizer, wraps the target Linears, runs forwards with adapter slots.

    Only the scheduler's worker thread calls :meth:`forward` (the slots are shared state).
    """

    def __init__(
        self,
        model_id_or_path: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        allow_hub: bool = False,
        target_modules: Sequence[str] | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = str(model_id_or_path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        local = Path(self.model_id).is_dir()
        if not local and not allow_hub:
            raise NotFound(
                f"model {self.model_id!r}: no such directory (hub downloads are off; "
                "enable them to fetch from the Hugging Face Hub)"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_id, local_files_only=local)
        except (OSError, ValueError, TypeError, KeyError) as exc:  # transformers' many ways
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidArgument(
                f"model {self.model_id!r}: no usable tokenizer ({reason[:200]}); save the "
                "tokenizer with the model (tokenizer.json, tokenizer_config.json)"
            ) from None
        model = AutoModelForCausalLM.from_pretrained(
            self.model_id, dtype=self.dtype, local_files_only=local
        )
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.slots = AdapterSlots()
        self.lora_layers: dict[str, LoraLinear] = wrap_linears(
            self.model, target_modules, self.slots
        )
        if not self.lora_layers:
            raise InvalidArgument(f"model {self.model_id!r}: no Linear layer to put LoRA on")

        config = self.model.config
        self.max_position_embeddings: int | None = getattr(config, "max_position_embeddings", None)
        self.eos_token_ids: frozenset[int] = frozenset(self._eos_ids())
        # A fast tokenizer may reconfigure itself (a mutable borrow in Rust) on its first call;
        # do that now, before request threads encode while the worker decodes.
        self._encode_lock = threading.Lock()
        self.encode("warm-up")
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else min(self.eos_token_ids, default=0)
        log.info(
            "model %s on %s/%s: %d LoRA-wrapped Linear layers, max positions %s",
            self.model_id,
            self.device,
            str(self.dtype).removeprefix("torch."),
            len(self.lora_layers),
            self.max_position_embeddings,
        )

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_config = getattr(self.model, "generation_config", None)
        for source in (getattr(gen_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source is not None:
                ids.update(source)
        return ids

    def encode(self, text: str) -> list[int]:
        """Prompt token ids, special tokens (BOS) added as the model's tokenizer does."""
        with self._encode_lock:
            return list(self.tokenizer(text)["input_ids"])

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``{module_path: (in_features, out_features)}`` of the LoRA-wrapped layers."""
        return {p: (m.in_features, m.out_features) for p, m in self.lora_layers.items()}

    @contextmanager
    def adapters(self, slots: Sequence[FlatAdapter | None]) -> Iterator[None]:
        """Set one adapter slot per batch row for the forwards inside the block."""
        self.slots.set(slots, self.device)
        try:
            yield
        finally:
            self.slots.clear()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
        slots: Sequence[FlatAdapter | None],
    ) -> torch.Tensor:
        """One forward over ``(batch, seq)`` tokens; returns the last position's logits, fp32."""
        with self.adapters(slots):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :].float()
