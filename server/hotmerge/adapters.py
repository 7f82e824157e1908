"""The adapter store: PEFT LoRA adapters loaded once, resident on the device, LRU by bytes.

An adapter id is a directory under the store's root (``name`` or ``org/name``) holding
``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format. Ids never resolve
outside the root. A running request pins its adapter (:meth:`AdapterStore.acquire` /
:meth:`AdapterStore.release`, or :meth:`AdapterStore.use`) so that eviction never takes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hotmerge_kernels.layout import FlatAdapter
from safetensors import safe_open

from hotmerge.errors import InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# One or two path components of plain characters; no component may start with '.'.
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)?")
_KEY_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    nbytes: int  # on the device, in the store's dtype
    loaded: bool
    revision: str  # sha256 hex prefix of the weights file then the config file


@dataclass(eq=False)
class LoadedAdapter:
    info: AdapterInfo
    weights: FlatAdapter  # on the store's device and dtype; scaling alpha/r or alpha/sqrt(r)


@dataclass(frozen=True)
class LoraConfig:
    """What the store reads from adapter_config.json (validated)."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def parse_lora_config(adapter_id: str, raw: dict) -> LoraConfig:
    """Validate a PEFT adapter config; unsupported features are InvalidArgument, not ignored."""

    def bad(what: str) -> InvalidArgument:
        return InvalidArgument(f"adapter {adapter_id!r}: {what}")

    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise bad(f"peft_type is {raw.get('peft_type')!r}; only LoRA adapters are supported")
    rank, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0:
        raise bad(f"r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise bad(f"lora_alpha must be a number, got {alpha!r}")
    unsupported = {
        "use_dora": raw.get("use_dora") and "DoRA (use_dora) is not supported yet",
        "rank_pattern": raw.get("rank_pattern") and "rank_pattern is not supported yet",
        "alpha_pattern": raw.get("alpha_pattern") and "alpha_pattern is not supported yet",
        "bias": raw.get("bias", "none") not in ("none", None)
        and f"bias={raw.get('bias')!r} is not supported yet (only 'none')",
        "modules_to_save": raw.get("modules_to_save") and "modules_to_save is not supported yet",
        "fan_in_fan_out": raw.get("fan_in_fan_out")
        and "fan_in_fan_out (Conv1D layers) is not supported yet",
        "lora_bias": raw.get("lora_bias") and "lora_bias is not supported yet",
    }
    for message in unsupported.values():
        if message:
            raise bad(message)
    targets = raw.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    return LoraConfig(rank, float(alpha), bool(raw.get("use_rslora", False)), targets)


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class _Entry:
    adapter: LoadedAdapter
    pins: int = 0


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
    ) -> None:
        self.root = Path(root)
        self.device = torch.device(device)
        self.dtype = dtype
        self.budget_bytes = int(budget_bytes)
        self.module_shapes = dict(module_shapes)
        self.allow_hub = allow_hub
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest use first
        self._loading: dict[str, threading.Event] = {}
        self._used = 0
        self.loads = 0  # how many times an adapter was read from disk (for tests and metrics)
        self._revisions: dict[tuple[str, int, int], str] = {}  # (path, mtime, size) -> digest

    # -- public API ---------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    def get(self, adapter_id: str) -> tuple[LoadedAdapter, float]:
        """The loaded adapter and the ms spent loading it here (0.0 if it was resident)."""
        return self._get(adapter_id, pin=False)

    def acquire(self, adapter_id: str) -> tuple[LoadedAdapter, float]:
        """Like :meth:`get`, and pins the adapter until :meth:`release` (never evicted)."""
        return self._get(adapter_id, pin=True)

    def release(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1

    @contextmanager
    def use(self, adapter_id: str) -> Iterator[LoadedAdapter]:
        adapter, _ = self.acquire(adapter_id)
        try:
            yield adapter
        finally:
            self.release(adapter_id)

    def load(self, adapter_id: str) -> tuple[AdapterInfo, float]:
        adapter, load_ms = self.get(adapter_id)
        return adapter.info, load_ms

    def unload(self, adapter_id: str) -> bool:
        """Drop a resident adapter; False if it was not loaded. A pinned one cannot be dropped."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return False
            if entry.pins:
                raise ResourceExhausted(
                    f"adapter {adapter_id!r} is in use by {entry.pins} running request(s); "
                    "unload it when they finish"
                )
            self._drop(adapter_id)
            return True

    def list(self) -> list[AdapterInfo]:
        """Loaded adapters, then those found under the root that are not loaded."""
        with self._lock:
            infos = {aid: e.adapter.info for aid, e in self._entries.items()}
        for adapter_id in self._scan_root():
            if adapter_id in infos:
                continue
            try:
                infos[adapter_id] = self._describe(adapter_id, self._local_dir(adapter_id))
            except (InvalidArgument, NotFound, OSError, ValueError) as exc:
                log.debug("skipping %s in the adapter list: %s", adapter_id, exc)
        return sorted(infos.values(), key=lambda i: (not i.loaded, i.id))

    def resident_revisions(self, adapter_ids: Sequence[str]) -> tuple[str, ...] | None:
        """The revisions of these adapters if all are resident now (no load, no pin), else None."""
        with self._lock:
            entries = [self._entries.get(i) for i in adapter_ids]
        if any(e is None for e in entries):
            return None
        return tuple(e.adapter.info.revision for e in entries)

    @property
    def loaded_count(self) -> int:
        with self._lock:
            return len(self._entries)

    def is_loaded(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._entries

    # -- loading ------------------------------------------------------------------------------

    def _get(self, adapter_id: str, *, pin: bool) -> tuple[LoadedAdapter, float]:
        self._check_id(adapter_id)
        start = time.perf_counter()
        while True:
            with self._lock:
                entry = self._entries.get(adapter_id)
                if entry is not None:
                    self._entries.move_to_end(adapter_id)
                    entry.pins += pin
                    waited = (time.perf_counter() - start) * 1000
                    return entry.adapter, (waited if waited > 1.0 else 0.0)
                event = self._loading.get(adapter_id)
                if event is None:  # nobody is loading it: this thread does
                    event = self._loading[adapter_id] = threading.Event()
                    break
            event.wait()  # another thread is loading it; then look again (it may have failed)
        try:
            adapter = self._read(adapter_id)
            with self._lock:
                self._make_room(adapter_id, adapter.info.nbytes)
                self._entries[adapter_id] = _Entry(adapter, pins=int(pin))
                self._used += adapter.info.nbytes
        finally:
            with self._lock:
                del self._loading[adapter_id]
            event.set()
        load_ms = (time.perf_counter() - start) * 1000
        log.info(
            "loaded adapter %s (rank %d, %d modules, %.1f MiB) in %.1f ms",
            adapter_id,
            adapter.info.rank,
            len(adapter.weights.modules),
            adapter.info.nbytes / 2**20,
            load_ms,
        )
        return adapter, load_ms

    def _make_room(self, adapter_id: str, nbytes: int) -> None:
        """Evict unpinned adapters, least recently used first, until ``nbytes`` fits."""
        if nbytes > self.budget_bytes:
            raise ResourceExhausted(
                f"adapter {adapter_id!r} needs {nbytes} bytes, more than the adapter budget "
                f"of {self.budget_bytes} bytes"
            )
        while self._used + nbytes > self.budget_bytes:
            victim = next((aid for aid, e in self._entries.items() if e.pins == 0), None)
            if victim is None:
                raise ResourceExhausted(
                    f"adapter {adapter_id!r} ({nbytes} bytes) does not fit: the adapter budget "
                    f"of {self.budget_bytes} bytes is held by adapters in use; retry later"
                )
            log.info("evicting adapter %s (least recently used)", victim)
            self._drop(victim)

    def _drop(self, adapter_id: str) -> None:
        entry = self._entries.pop(adapter_id)
        self._used -= entry.adapter.info.nbytes

    def _read(self, adapter_id: str) -> LoadedAdapter:
        directory = self._resolve(adapter_id)
        info = self._describe(adapter_id, directory)
        config = self._config(adapter_id, directory)
        tensors: dict[tuple[str, str], torch.Tensor] = {}
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                module, part = self._parse_key(adapter_id, key)
                tensors[(module, part)] = f.get_tensor(key)
        self._check_shapes(adapter_id, config.rank, tensors)
        # Pack on the host, then one copy to the device (not one per tensor).
        packed = FlatAdapter.from_tensors(
            tensors, rank=config.rank, scaling=config.scaling, dtype=self.dtype, device="cpu"
        )
        weights = FlatAdapter(
            buffer=packed.buffer.to(self.device),
            segments=packed.segments,
            rank=packed.rank,
            scaling=packed.scaling,
        )
        with self._lock:
            self.loads += 1
        return LoadedAdapter(replace(info, loaded=True, nbytes=weights.nbytes), weights)

    def _parse_key(self, adapter_id: str, key: str) -> tuple[str, str]:
        m = _KEY_RE.fullmatch(key)
        if m is None:
            raise InvalidArgument(
                f"adapter {adapter_id!r}: unsupported tensor {key!r} (expected PEFT LoRA keys "
                "'base_model.model.<module>.lora_A.weight' / '.lora_B.weight')"
            )
        return m["module"], m["part"]

    def _check_shapes(
        self, adapter_id: str, rank: int, tensors: dict[tuple[str, str], torch.Tensor]
    ) -> None:
        if not tensors:
            raise InvalidArgument(f"adapter {adapter_id!r}: the weights file has no LoRA tensors")
        for module in sorted({m for m, _ in tensors}):
            if module not in self.module_shapes:
                raise InvalidArgument(
                    f"adapter {adapter_id!r}: module {module!r} is not a LoRA target layer of "
                    "the served model (wrong base model?)"
                )
            fan_in, fan_out = self.module_shapes[module]
            for part, expected in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
                t = tensors.get((module, part))
                if t is None:
                    raise InvalidArgument(
                        f"adapter {adapter_id!r}: module {module!r} has no lora_{part} tensor"
                    )
                if tuple(t.shape) != expected:
                    raise InvalidArgument(
                        f"adapter {adapter_id!r}: module {module!r} lora_{part} has shape "
                        f"{tuple(t.shape)}, expected {expected} (wrong base model?)"
                    )

    # -- files ------------------------------------------------------------------------------

    def _check_id(self, adapter_id: str) -> None:
        if not isinstance(adapter_id, str) or not _ID_RE.fullmatch(adapter_id):
            raise InvalidArgument(
                f"adapter id {adapter_id!r} is not valid: use 'name' or 'org/name' "
                "(letters, digits, '.', '_', '-'; no '..', no absolute path)"
            )

    def _local_dir(self, adapter_id: str) -> Path:
        """The adapter's directory under the root; never a path outside it (symlinks too)."""
        self._check_id(adapter_id)
        root = self.root.resolve()
        directory = (root / adapter_id).resolve()
        if not directory.is_relative_to(root):
            raise InvalidArgument(f"adapter id {adapter_id!r} resolves outside the adapter root")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            path = directory / name
            if path.exists() and not path.resolve().is_relative_to(root):
                raise InvalidArgument(
                    f"adapter {adapter_id!r}: {name} resolves outside the adapter root"
                )
        return directory

    def _resolve(self, adapter_id: str) -> Path:
        directory = self._local_dir(adapter_id)
        if not (directory / CONFIG_FILE).is_file():
            if self.allow_hub and "/" in adapter_id:
                return self._download(adapter_id)
            raise NotFound(f"adapter {adapter_id!r} not found under the adapter root")
        if not (directory / WEIGHTS_FILE).is_file():
            if any(directory.glob("*.bin")):
                raise InvalidArgument(
                    f"adapter {adapter_id!r} has only pickle weights (.bin); convert it to "
                    f"safetensors ({WEIGHTS_FILE}), e.g. load it with peft and save_pretrained"
                )
            raise NotFound(f"adapter {adapter_id!r}: no {WEIGHTS_FILE} in its directory")
        return directory

    def _download(self, adapter_id: str) -> Path:
        """Fetch config + safetensors of a hub adapter into the root (only with allow_hub)."""
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                repo_id=adapter_id,
                allow_patterns=[CONFIG_FILE, "*.safetensors"],
                local_dir=str(self.root / adapter_id),
            )
        except Exception as exc:  # the hub's errors are many; all mean "could not get it"
            raise NotFound(f"adapter {adapter_id!r}: hub download failed: {exc}") from exc
        directory = Path(path)
        if not (directory / WEIGHTS_FILE).is_file():
            raise InvalidArgument(f"adapter {adapter_id!r}: the hub repo has no {WEIGHTS_FILE}")
        return directory

    def _config(self, adapter_id: str, directory: Path) -> LoraConfig:
        try:
            raw = json.loads((directory / CONFIG_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgument(
                f"adapter {adapter_id!r}: unreadable {CONFIG_FILE}: {exc}"
            ) from exc
        if not isinstance(raw, dict):
            raise InvalidArgument(f"adapter {adapter_id!r}: {CONFIG_FILE} is not an object")
        return parse_lora_config(adapter_id, raw)

    def _describe(self, adapter_id: str, directory: Path) -> AdapterInfo:
        """Info from the files alone (loaded=False); nbytes from the safetensors header."""
        config = self._config(adapter_id, directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise NotFound(f"adapter {adapter_id!r}: no {WEIGHTS_FILE}")
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
        return AdapterInfo(
            id=adapter_id,
            rank=config.rank,
            alpha=config.alpha,
            use_rslora=config.use_rslora,
            target_modules=config.target_modules,
            nbytes=numel * self.dtype.itemsize,
            loaded=False,
            revision=self._revision(directory),
        )

    def _revision(self, directory: Path) -> str:
        weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
        st, sc = weights.stat(), config.stat()
        key = (str(directory), st.st_mtime_ns + sc.st_mtime_ns, st.st_size + sc.st_size)
        if key not in self._revisions:
            self._revisions[key] = file_digest(weights, config)
        return self._revisions[key]

    def _scan_root(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = []
        for config in sorted(self.root.glob(f"*/{CONFIG_FILE}")) + sorted(
            self.root.glob(f"*/*/{CONFIG_FILE}")
        ):
            adapter_id = config.parent.relative_to(self.root).as_posix()
            if _ID_RE.fullmatch(adapter_id):
                found.append(adapter_id)
        return found
