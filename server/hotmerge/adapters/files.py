"""Reading a PEFT LoRA adapter's files, checked before anything big is read into memory.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Nothing here
trusts them:

- the config is read only up to ``MAX_CONFIG_BYTES``, parsed with nesting bounded, and each
  field used is checked for type and range (``parse_lora_config``);
- the safetensors header is parsed by hand (``read_header``): its length against the file and
  ``MAX_HEADER_BYTES``, JSON, each tensor's dtype (float16, bfloat16 or float32 only), shape
  and offsets (in range, matching the shape's size, contiguous and non-overlapping). The caller
  checks names, shapes and total size against the model and its budget from this header, before
  a single tensor is read;
- tensors are then read at the offsets just checked (``read_tensors``), and their values must
  be finite and of a sane magnitude (``check_values``, on the tensors as they will be served).

Files are opened with ``open_regular``: a FIFO, device or socket planted under the adapter
root is refused at once, never waited on, and a symlink loop is a bad file, not a crash.

Every problem is one ``InvalidArgument`` naming the adapter, the file and the problem.
The content revision (sha256 of the weights file then the config file) is computed from the
bytes ``read_tensors`` reads anyway, so listing adapters never reads whole weights files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from hotmerge.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20  # PEFT headers are ~150 bytes a tensor: 100k tensors fit
MAX_RANK = 8192
MAX_ALPHA = 1e5
# LoRA weights are O(1) or smaller; beyond this the products overflow half-precision activations.
MAX_ABS_WEIGHT = 1e4
MAX_TENSORS = 100_000
MAX_DIM = 1 << 40

# safetensors dtype names accepted, and what they are in torch.
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_KEY_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


def short(text: str, limit: int = 64) -> str:
    """``text`` for a message or log line: repr, cut to ``limit`` characters (ids can be long)."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"…({len(text)} chars)"


def _bad(adapter_id: str, file: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"adapter {short(adapter_id)}: {file}: {problem}")


class NotRegularFile(OSError):
    """The path is a FIFO, device, socket or directory: never read."""


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, only if it is a regular file; never blocks.

    O_NONBLOCK makes opening a FIFO return at once (a blocking open waits for a writer
    forever); fstat on the open descriptor then says what it is, with no race between a check
    and the open. Raises OSError (ELOOP for a symlink loop, NotRegularFile for the rest)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path.name} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _why(exc: OSError) -> str:
    return (
        "it is not a regular file"
        if isinstance(exc, NotRegularFile)
        else (exc.strerror or str(exc))
    )


# -- the config ---------------------------------------------------------------------------------


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


def read_config(adapter_id: str, path: Path) -> tuple[LoraConfig, bytes]:
    """The validated config and the file's bytes (for the revision)."""
    try:
        with open_regular(path) as f:
            raw_bytes = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise _bad(adapter_id, CONFIG_FILE, f"cannot be read ({_why(exc)})") from None
    if len(raw_bytes) > MAX_CONFIG_BYTES:
        raise _bad(adapter_id, CONFIG_FILE, f"is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(raw_bytes)
    except RecursionError:
        raise _bad(adapter_id, CONFIG_FILE, "is nested too deeply") from None
    except ValueError as exc:  # also bad UTF-8
        raise _bad(adapter_id, CONFIG_FILE, f"is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise _bad(adapter_id, CONFIG_FILE, "is not a JSON object")
    return parse_lora_config(adapter_id, raw), raw_bytes


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def parse_lora_config(adapter_id: str, raw: dict) -> LoraConfig:
    """Validate a PEFT adapter config; unsupported features are InvalidArgument, not ignored."""

    def bad(what: str) -> InvalidArgument:
        return _bad(adapter_id, CONFIG_FILE, what)

    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise bad(f"peft_type is {short(str(peft_type))}; only LoRA adapters are supported")
    rank, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise bad(f"r must be an integer in [1, {MAX_RANK}], got {short(repr(rank))}")
    if not _is_number(alpha) or not math.isfinite(alpha) or abs(alpha) > MAX_ALPHA:
        raise bad(f"lora_alpha must be a finite number of at most {MAX_ALPHA:g} in size, got "
                  f"{short(repr(alpha))}")  # fmt: skip
    use_rslora = raw.get("use_rslora", False)
    if use_rslora is not None and not isinstance(use_rslora, bool):
        raise bad(f"use_rslora must be true or false, got {short(repr(use_rslora))}")
    unsupported = {
        "use_dora": raw.get("use_dora") and "DoRA (use_dora) is not supported yet",
        "rank_pattern": raw.get("rank_pattern") and "rank_pattern is not supported yet",
        "alpha_pattern": raw.get("alpha_pattern") and "alpha_pattern is not supported yet",
        "bias": raw.get("bias", "none") not in ("none", None)
        and f"bias={short(repr(raw.get('bias')))} is not supported yet (only 'none')",
        "modules_to_save": raw.get("modules_to_save") and "modules_to_save is not supported yet",
        "fan_in_fan_out": raw.get("fan_in_fan_out")
        and "fan_in_fan_out (Conv1D layers) is not supported yet",
        "lora_bias": raw.get("lora_bias") and "lora_bias is not supported yet",
    }
    for message in unsupported.values():
        if message:
            raise bad(message)
    targets = raw.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, list | tuple) or not all(
        isinstance(t, str) and 0 < len(t) <= 256 for t in targets
    ):
        raise bad(f"target_modules must be a module name or a list of them, got "
                  f"{short(repr(targets))}")  # fmt: skip
    return LoraConfig(rank, float(alpha), bool(use_rslora), tuple(sorted(targets)))


# -- the weights header -------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    name: str
    module: str
    part: str  # "A" or "B"
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data area (after the header)
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class WeightsHeader:
    data_start: int  # byte offset of the data area in the file
    file_size: int
    tensors: tuple[TensorEntry, ...]  # in file order

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)


def read_header(adapter_id: str, path: Path) -> WeightsHeader:
    """Parse and check the safetensors header of ``path``; reads only the header's bytes."""

    def bad(problem: str) -> InvalidArgument:
        return _bad(adapter_id, WEIGHTS_FILE, problem)

    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"is {size} bytes, too short for a safetensors file")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise bad(f"declares a header of {n} bytes (at most {MAX_HEADER_BYTES})")
            if 8 + n > size:
                raise bad(f"declares a header of {n} bytes but the file is {size} bytes")
            text = f.read(n)
    except OSError as exc:
        raise bad(f"cannot be read ({_why(exc)})") from None
    try:
        raw = json.loads(text)
    except RecursionError:
        raise bad("the header is nested too deeply") from None
    except ValueError:
        raise bad("the header is not JSON (not a safetensors file?)") from None
    if not isinstance(raw, dict):
        raise bad("the header is not a JSON object")
    raw.pop("__metadata__", None)
    if not raw:
        raise bad("has no tensors")
    if len(raw) > MAX_TENSORS:
        raise bad(f"has {len(raw)} tensors (at most {MAX_TENSORS})")
    data_size = size - 8 - n
    tensors = [_entry(bad, name, value, data_size) for name, value in raw.items()]
    # The data area must be exactly covered, tensor after tensor: no overlap, no gap, no tail.
    at = 0
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin < at:
            raise bad(f"tensor {short(t.name)} overlaps the one before it")
        if t.begin > at:
            raise bad(f"bytes {at}..{t.begin} of the data belong to no tensor")
        at = t.end
    if at != data_size:
        raise bad(f"the data area is {data_size} bytes but the tensors cover {at}")
    return WeightsHeader(data_start=8 + n, file_size=size, tensors=tuple(tensors))


def _entry(bad, name: str, value, data_size: int) -> TensorEntry:
    if not isinstance(value, dict):
        raise bad(f"tensor {short(name)}: its header entry is not an object")
    m = _KEY_RE.fullmatch(name)
    if m is None:
        raise bad(
            f"unsupported tensor {short(name)} (expected PEFT LoRA keys "
            "'base_model.model.<module>.lora_A.weight' / '.lora_B.weight')"
        )
    dtype = DTYPES.get(value.get("dtype")) if isinstance(value.get("dtype"), str) else None
    if dtype is None:
        raise bad(
            f"tensor {short(name)} has dtype {short(str(value.get('dtype')))}; LoRA weights "
            "must be float16 (F16), bfloat16 (BF16) or float32 (F32)"
        )
    shape, offsets = value.get("shape"), value.get("data_offsets")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM
                   for d in shape)
    ):  # fmt: skip
        raise bad(f"tensor {short(name)} has shape {short(repr(shape))}; LoRA tensors are "
                  "2-D with positive sizes")  # fmt: skip
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise bad(f"tensor {short(name)} has data_offsets {short(repr(offsets))} outside the "
                  f"{data_size}-byte data area")  # fmt: skip
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"tensor {short(name)} of shape {shape} needs {nbytes} bytes but its "
                  f"data_offsets span {offsets[1] - offsets[0]}")  # fmt: skip
    return TensorEntry(name, m["module"], m["part"], dtype, tuple(shape), offsets[0], offsets[1])


# -- the tensors ----------------------------------------------------------------------------------


def read_tensors(
    adapter_id: str, path: Path, header: WeightsHeader, config_bytes: bytes
) -> tuple[dict[tuple[str, str], torch.Tensor], str]:
    """``{(module, part): tensor}`` read at the header's offsets, and the content revision.

    The whole file is read once, in order, and hashed as it goes.
    """
    digest = hashlib.sha256()
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    try:
        with open_regular(path) as f:
            head = f.read(header.data_start)
            digest.update(head)
            for t in sorted(header.tensors, key=lambda t: t.begin):
                data = bytearray(t.end - t.begin)
                if f.readinto(data) != len(data):
                    raise _bad(adapter_id, WEIGHTS_FILE, "is shorter than its header says")
                digest.update(data)
                flat = (
                    torch.frombuffer(data, dtype=t.dtype) if data else torch.empty(0, dtype=t.dtype)
                )
                tensors[(t.module, t.part)] = flat.view(t.shape)
    except OSError as exc:
        raise _bad(adapter_id, WEIGHTS_FILE, f"cannot be read ({_why(exc)})") from None
    digest.update(config_bytes)
    return tensors, digest.hexdigest()[:16]


def check_values(adapter_id: str, buffer: torch.Tensor) -> None:
    """The weights as served (the store's dtype) must be finite and of sane magnitude."""
    finite = torch.isfinite(buffer)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise _bad(
            adapter_id,
            WEIGHTS_FILE,
            f"{bad} weight(s) are NaN or infinite in {buffer.dtype} (corrupt, or too large for "
            "the served dtype)",
        )
    largest = float(buffer.abs().max()) if buffer.numel() else 0.0
    if largest > MAX_ABS_WEIGHT:
        raise _bad(
            adapter_id,
            WEIGHTS_FILE,
            f"a weight of magnitude {largest:.3g} is larger than {MAX_ABS_WEIGHT:g}; LoRA "
            "weights this large overflow the model's activations",
        )
