"""The adapter store: PEFT LoRA adapters loaded once, resident on the device, LRU by bytes.

An adapter id is a directory under the store's root (``name`` or ``org/name``) holding
``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format; ``root.AdapterRoot``
checks ids and resolves them to folders, never outside the root. A running request pins its
adapter (:meth:`AdapterStore.acquire` / :meth:`AdapterStore.release`, or :meth:`AdapterStore.use`)
so that eviction never takes it.

The files are checked by ``adapter_files`` before anything is read into memory: the config, and
the safetensors header against the served model's modules and the adapter budget. Residency
(pins, LRU by bytes, one load per id, waits bounded by the request's deadline and
``max_wait_s``) is ``pinned_lru.PinnedLRU``, shared with the merge cache. Listing reads configs
and headers only; an adapter whose files are bad is left out of the list (and logged).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hotmerge_kernels.layout import FlatAdapter

from hotmerge.adapters.files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoraConfig,
    WeightsHeader,
    check_values,
    parse_lora_config,
    read_config,
    read_header,
    read_tensors,
    short,
)
from hotmerge.adapters.pinned_lru import PinnedLRU
from hotmerge.adapters.root import AdapterRoot
from hotmerge.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

__all__ = ["AdapterInfo", "AdapterStore", "LoadedAdapter", "LoraConfig", "parse_lora_config"]


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    nbytes: int  # on the device, in the store's dtype
    loaded: bool
    # sha256 hex prefix of the weights file then the config file, computed while loading (the
    # file is read then anyway); "" in a listing of an adapter not loaded since it changed.
    revision: str

    @property
    def content_key(self) -> str:
        """Names these weights (``id@revision``): what KV computed with them is cached under."""
        return f"{self.id}@{self.revision}"


@dataclass(eq=False)
class LoadedAdapter:
    info: AdapterInfo
    weights: FlatAdapter  # on the store's device and dtype; scaling alpha/r or alpha/sqrt(r)


class AdapterStore:
    """Loads PEFT adapters onto the device on first use; evicts least recently used by bytes."""

    def __init__(
        self,
        root: Path | str,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        budget_bytes: int,
        module_shapes: dict[str, tuple[int, int]],
        allow_hub: bool = False,
        max_wait_s: float = 30.0,
        max_rank: int | None = None,
    ) -> None:
        self.adapter_root = AdapterRoot(root, allow_hub=allow_hub)  # where the folders are
        self.max_rank = max_rank  # the engine's --max-lora-rank: LoadAdapter refuses wider
        self.device = torch.device(device)
        self.dtype = dtype
        self.module_shapes = dict(module_shapes)
        self._lru: PinnedLRU[LoadedAdapter] = PinnedLRU(
            budget_bytes,
            what="adapter",
            budget_name="adapter budget (--adapter-budget-mib)",
            max_wait_s=max_wait_s,
        )
        self.loads = 0  # how many times an adapter was read from disk (for tests and metrics)
        # Content revisions by (weights path, size, mtime, config size, mtime), from loads.
        self._revisions: dict[tuple, str] = {}

    # -- public API ---------------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int:
        return self._lru.budget_bytes

    @property
    def used_bytes(self) -> int:
        return self._lru.used_bytes

    def get(self, adapter_id: str, *, deadline: float | None = None) -> tuple[LoadedAdapter, float]:
        """The loaded adapter and the ms spent loading it here (0.0 if it was resident)."""
        return self._get(adapter_id, pin=False, deadline=deadline)

    def acquire(
        self, adapter_id: str, *, deadline: float | None = None
    ) -> tuple[LoadedAdapter, float]:
        """Like :meth:`get`, and pins the adapter until :meth:`release` (never evicted).

        Waits for room (adapters pinned by running requests) or for another request loading
        the same adapter end by ``deadline`` (DeadlineExceeded) and the store's ``max_wait_s``
        (ResourceExhausted)."""
        return self._get(adapter_id, pin=True, deadline=deadline)

    def release(self, adapter_id: str) -> None:
        self._lru.release(adapter_id)

    def pins(self, adapter_id: str) -> int:
        """How many running requests hold this adapter now."""
        return self._lru.pins(adapter_id)

    @contextmanager
    def use(self, adapter_id: str) -> Iterator[LoadedAdapter]:
        adapter, _ = self.acquire(adapter_id)
        try:
            yield adapter
        finally:
            self.release(adapter_id)

    def load(self, adapter_id: str, *, deadline: float | None = None) -> tuple[AdapterInfo, float]:
        """Load (LoadAdapter): an adapter wider than ``max_rank`` is refused, not loaded."""
        self.adapter_root.check_id(adapter_id)
        if self.max_rank is not None and self._lru.peek(adapter_id) is None:
            info = self._describe(adapter_id, self.adapter_root.resolve(adapter_id))[0]
            if info.rank > self.max_rank:
                raise InvalidArgument(
                    f"adapter {short(adapter_id)}: rank {info.rank} is more than the engine's "
                    f"max LoRA rank {self.max_rank} (start the server with a larger "
                    "--max-lora-rank)"
                )
        adapter, load_ms = self.get(adapter_id, deadline=deadline)
        return adapter.info, load_ms

    def unload(self, adapter_id: str) -> bool:
        """Drop a resident adapter; False if it was not loaded. A pinned one cannot be dropped.

        Its device memory goes back at once: nothing else keeps the tensors (on CUDA the
        allocator's cache is emptied too)."""
        self.adapter_root.check_id(adapter_id)
        if self._lru.remove(adapter_id) is None:
            return False
        free_device_memory(self.device)
        return True

    def list(self) -> list[AdapterInfo]:
        """Loaded adapters, then those found under the root that are not loaded.

        Reads configs and safetensors headers only; a folder with bad files is left out."""
        infos = {aid: a.info for aid, a in self._lru.items()}
        for adapter_id in self.adapter_root.ids():
            if adapter_id in infos:
                continue
            try:
                directory = self.adapter_root.local_dir(adapter_id)
                infos[adapter_id] = self._describe(adapter_id, directory, fits_model=False)[0]
            except (InvalidArgument, NotFound, OSError) as exc:
                log.warning("adapter list: skipping %s: %s", short(adapter_id), exc)
        return sorted(infos.values(), key=lambda i: (not i.loaded, i.id))

    def resident_revisions(self, adapter_ids: Sequence[str]) -> tuple[str, ...] | None:
        """The revisions of these adapters if all are resident now (no load, no pin), else None."""
        revisions = []
        for adapter_id in adapter_ids:
            adapter = self._lru.peek(adapter_id)
            if adapter is None:
                return None
            revisions.append(adapter.info.revision)
        return tuple(revisions)

    def size_of(self, adapter_id: str) -> int:
        """Device bytes the adapter takes (resident) or would take (from its header)."""
        resident = self._lru.peek(adapter_id)
        if resident is not None:
            return resident.info.nbytes
        return self._describe(adapter_id, self.adapter_root.resolve(adapter_id))[0].nbytes

    @property
    def loaded_count(self) -> int:
        return len(self._lru)

    def is_loaded(self, adapter_id: str) -> bool:
        return adapter_id in self._lru

    # -- loading ------------------------------------------------------------------------------

    def _get(
        self, adapter_id: str, *, pin: bool, deadline: float | None
    ) -> tuple[LoadedAdapter, float]:
        self.adapter_root.check_id(adapter_id)
        checked = None
        if self._lru.peek(adapter_id) is None:  # check files and budget before reading weights
            directory = self.adapter_root.resolve(adapter_id)
            checked = directory, *self._describe(adapter_id, directory)

        def make() -> tuple[LoadedAdapter, int]:
            nonlocal checked
            if checked is None:  # it was resident, and was evicted since: check again
                directory = self.adapter_root.resolve(adapter_id)
                checked = directory, *self._describe(adapter_id, directory)
            adapter = self._read(adapter_id, *checked)
            return adapter, adapter.info.nbytes

        size = None if checked is None else checked[1].nbytes
        start = time.perf_counter()
        adapter, event, _ = self._lru.acquire(
            adapter_id, make, pin=pin, size=size, deadline=deadline
        )
        if event == "hit":
            return adapter, 0.0
        load_ms = (time.perf_counter() - start) * 1000
        if event == "miss":
            log.info(
                "loaded adapter %s (rank %d, %d modules, %.1f MiB) in %.1f ms",
                adapter_id,
                adapter.info.rank,
                len(adapter.weights.modules),
                adapter.info.nbytes / 2**20,
                load_ms,
            )
        return adapter, load_ms

    def _read(
        self,
        adapter_id: str,
        directory: Path,
        info: AdapterInfo,
        config: LoraConfig,
        header: WeightsHeader,
    ) -> LoadedAdapter:
        weights_path = directory / WEIGHTS_FILE
        _, config_bytes = read_config(adapter_id, directory / CONFIG_FILE)
        tensors, revision = read_tensors(adapter_id, weights_path, header, config_bytes)
        # Pack on the host in the served dtype, check the values as they will be served, then
        # one copy to the device (not one per tensor).
        packed = FlatAdapter.from_tensors(
            tensors, rank=config.rank, scaling=config.scaling, dtype=self.dtype, device="cpu"
        )
        del tensors
        check_values(adapter_id, packed.buffer)
        weights = FlatAdapter(
            buffer=packed.buffer.to(self.device),
            segments=packed.segments,
            rank=packed.rank,
            scaling=packed.scaling,
        )
        self._revisions[self.adapter_root.file_key(directory)] = revision
        self.loads += 1
        return LoadedAdapter(
            replace(info, loaded=True, nbytes=weights.nbytes, revision=revision), weights
        )

    # -- describing ---------------------------------------------------------------------------

    def _describe(
        self, adapter_id: str, directory: Path, *, fits_model: bool = True
    ) -> tuple[AdapterInfo, LoraConfig, WeightsHeader]:
        """Info from the config and the weights header alone (loaded=False), both checked;
        with ``fits_model``, the tensors' names and shapes against the served model too."""
        config, _ = read_config(adapter_id, directory / CONFIG_FILE)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise NotFound(f"adapter {short(adapter_id)}: no {WEIGHTS_FILE}")
        header = read_header(adapter_id, weights)
        if fits_model:
            _check_fits_model(adapter_id, config.rank, header, self.module_shapes)
        info = AdapterInfo(
            id=adapter_id,
            rank=config.rank,
            alpha=config.alpha,
            use_rslora=config.use_rslora,
            target_modules=config.target_modules,
            nbytes=header.numel * self.dtype.itemsize,
            loaded=False,
            revision=self._revisions.get(self.adapter_root.file_key(directory), ""),
        )
        return info, config, header


def _check_fits_model(
    adapter_id: str, rank: int, header: WeightsHeader, module_shapes: dict[str, tuple[int, int]]
) -> None:
    """The header's tensors against the served model's modules and the config's rank."""
    shapes = {(t.module, t.part): t.shape for t in header.tensors}
    for module in sorted({m for m, _ in shapes}):
        if module not in module_shapes:
            raise InvalidArgument(
                f"adapter {short(adapter_id)}: module {module!r} is not a LoRA target layer "
                "of the served model (wrong base model?)"
            )
        fan_in, fan_out = module_shapes[module]
        for part, expected in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
            shape = shapes.get((module, part))
            if shape is None:
                raise InvalidArgument(
                    f"adapter {short(adapter_id)}: module {module!r} has no lora_{part} tensor"
                )
            if shape != expected:
                raise InvalidArgument(
                    f"adapter {short(adapter_id)}: module {module!r} lora_{part} has shape "
                    f"{shape}, expected {expected} (wrong base model?)"
                )


def free_device_memory(device: torch.device) -> None:
    """Give freed device memory back (CUDA keeps freed blocks cached for reuse otherwise)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
