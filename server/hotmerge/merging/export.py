"""Export a merge spec as a PEFT adapter directory, offline: no server, no model weights.

``export_merge`` reads the spec's adapters from an adapter root (module shapes come from the
adapters themselves), merges them with the serving engine (Triton on the GPU where there is one,
the torch twins elsewhere) and writes ``adapter_config.json`` + ``adapter_model.safetensors``
that PEFT loads on the base model (``PeftModel.from_pretrained``), and ``hotmerge_spec.json``
(the canonical spec, which PEFT ignores). The merged adapter has
``scaling == 1``, so the config says ``lora_alpha = r`` and no rsLoRA.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge import merge_adapters
from safetensors import safe_open
from safetensors.torch import save_file

from hotmerge.adapters.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore
from hotmerge.errors import InvalidArgument
from hotmerge.merging.spec import MergeSpec, affinity_key, canonical_spec

_PREFIX = "base_model.model."
SPEC_FILE = "hotmerge_spec.json"  # what was merged (PEFT ignores the file)


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    rank: int
    modules: int
    nbytes: int
    merge_ms: float
    backend: str


def export_merge(
    spec: MergeSpec,
    adapter_root: Path | str,
    out_dir: Path | str,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Merge ``spec`` from the adapters under ``adapter_root`` and write it to ``out_dir``.

    ``device``: default CUDA when available, else CPU. ``dtype``: default the first adapter's
    stored dtype. ``log`` gets one line per step (and per ~5% of modules for ΔW-space merges).
    """
    root = Path(adapter_root)
    out = Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dirs = [root / adapter_id for adapter_id in spec.adapter_ids]
    log(f"[1/3] reading {len(dirs)} adapters from {root}")
    shapes, stored_dtype = _module_shapes(dirs)
    store = AdapterStore(
        root, device=device, dtype=dtype or stored_dtype, budget_bytes=1 << 62,
        module_shapes=shapes,
    )  # fmt: skip
    inputs = [store.get(adapter_id)[0] for adapter_id in spec.adapter_ids]
    configs = [json.loads((d / CONFIG_FILE).read_text()) for d in dirs]

    log(f"[2/3] merging: {spec.params.strategy.value} on {device}")

    def progress(done: int, total: int, module: str) -> None:
        if done == total or done % max(1, total // 20) == 0:
            log(f"      {done}/{total} modules ({module})")

    try:
        result = merge_adapters([a.weights for a in inputs], spec.params, progress=progress)
    except ValueError as err:
        raise InvalidArgument(f"merge {list(spec.adapter_ids)}: {err}") from None
    merged = result.adapter
    log(f"      merged in {result.merge_ms:.1f} ms ({result.backend})")

    log(f"[3/3] writing {out}")
    check_out_dir(out, root)
    out.mkdir(parents=True, exist_ok=True)
    config = _merged_config(configs, merged, spec)
    provenance = {"spec": json.loads(canonical_spec(spec)), "affinity_key": affinity_key(spec)}
    check_out_dir(out, root)  # again: nothing planted while the merge ran
    save_file(_state_dict(merged), str(out / WEIGHTS_FILE))
    _write_new(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_new(out / SPEC_FILE, json.dumps(provenance, indent=2) + "\n")
    return ExportResult(
        out, merged.rank, len(merged.modules), merged.nbytes, result.merge_ms, result.backend
    )


def check_out_dir(out: Path, adapter_root: Path) -> None:
    """Refuse an output directory that is (or is reached through) a symlink, lies inside the
    adapter root (an export must not overwrite a served adapter), or holds symlinks where the
    files go. Raises InvalidArgument."""
    out = Path(out)
    if out.is_symlink():
        raise InvalidArgument(f"--out {out} is a symlink; give a plain directory")
    resolved, root = out.resolve(), Path(adapter_root).resolve()
    if resolved == root or resolved.is_relative_to(root):
        raise InvalidArgument(
            f"--out {out} is inside the adapter root {root}; write the export elsewhere, then "
            "copy it in if it should be served"
        )
    for name in (WEIGHTS_FILE, CONFIG_FILE, SPEC_FILE):
        target = out / name
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise InvalidArgument(f"--out {out}: {name} exists and is not a regular file")


def _write_new(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` without following a symlink there (O_NOFOLLOW)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _module_shapes(dirs: list[Path]) -> tuple[dict[str, tuple[int, int]], torch.dtype]:
    """{module: (in_features, out_features)} from the adapters' tensors, and the first's dtype."""
    shapes: dict[str, tuple[int, int]] = {}
    dtype = None
    for directory in dirs:
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise InvalidArgument(f"no {WEIGHTS_FILE} in {directory}")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            parts: dict[str, dict[str, list[int]]] = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                module, _, rest = key.removeprefix(_PREFIX).rpartition(".lora_")
                parts.setdefault(module, {})[rest[:1]] = f.get_slice(key).get_shape()
                if dtype is None:
                    dtype = f.get_tensor(key).dtype
            for module, found in parts.items():
                if "A" in found and "B" in found:
                    shapes.setdefault(module, (found["A"][1], found["B"][0]))
    return shapes, dtype or torch.float32


def _state_dict(merged: FlatAdapter) -> dict[str, torch.Tensor]:
    return {
        f"{_PREFIX}{seg.module}.lora_{seg.part}.weight": tensor.detach().cpu().contiguous()
        for seg, tensor in merged.items()
    }


def _merged_config(configs: list[dict], merged: FlatAdapter, spec: MergeSpec) -> dict:
    """The first adapter's config (as PEFT's add_weighted_adapter does), with the merged rank,
    lora_alpha = r (scaling 1), no rsLoRA, and the union of the target modules."""
    targets = [c.get("target_modules") or [] for c in configs]
    if any(isinstance(t, str) for t in targets):
        target_modules: str | list[str] = "|".join(
            f"({t})" if isinstance(t, str) else f"({'|'.join(t)})" for t in targets
        )
    else:
        target_modules = sorted({m for t in targets for m in t})
    config = dict(configs[0])
    config.update(
        r=merged.rank,
        lora_alpha=merged.rank,
        use_rslora=False,
        target_modules=target_modules,
        rank_pattern={},
        alpha_pattern={},
        inference_mode=True,
    )
    return config
