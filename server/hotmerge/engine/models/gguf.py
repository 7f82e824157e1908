"""GGUF files (llama.cpp's format) as transformers model folders, converted once and cached.

transformers reads a GGUF through the ``gguf`` package and dequantizes it; the result is saved
as a safetensors folder (float32, so the dequantized weights are kept exactly) with the
tokenizer and its chat template, in a cache folder named after the file. A record of the
file's path, size and modification time in it tells later starts to load it directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hotmerge.errors import InvalidArgument

log = logging.getLogger(__name__)

MARKER = ".converted-from.json"


def gguf_file(path: Path) -> Path | None:
    """The GGUF that ``path`` names: the file itself, or the one ``*.gguf`` in a folder that is
    not already a model folder (no config.json). None when ``path`` is neither."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise InvalidArgument(f"model {str(path)!r} holds several GGUF files ({names}); name one")
    return found[0] if found else None


def _source_record(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"file": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def converted_dir(gguf: Path, cache_root: Path, name: str | None = None) -> Path:
    """Where ``gguf``'s conversion lives (``name``, default the file's stem, is also what the
    OpenAI API calls the model)."""
    return cache_root / (name or gguf.stem)


def load_gguf(gguf: Path, **kwargs):
    """(model, tokenizer) that transformers reads from ``gguf``, dequantized; ``kwargs`` go to
    ``from_pretrained`` (``dtype``...). The model no longer carries the GGUF quantizer, which
    would stop ``save_pretrained`` and PEFT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def convert_gguf(gguf: Path, cache_root: Path, name: str | None = None) -> Path:
    """The model folder converted from ``gguf``: built now unless the folder's record says it
    was converted from this very file (path, size and modification time); see the module doc."""
    out = converted_dir(gguf, cache_root, name)
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()) == _source_record(gguf):
        return out
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise InvalidArgument(
            f"model {str(gguf)!r} is a GGUF file: install the gguf package to read it "
            "(pip install 'gguf>=0.10,<1')"
        ) from None
    size_mb = gguf.stat().st_size / 1e6
    # A line on stderr as well as the log: the first start waits on this.
    print(f"hotmerge: converting {gguf.name} ({size_mb:.0f} MB) into {out} (once) ...",
          file=sys.stderr, flush=True)  # fmt: skip
    start = time.perf_counter()
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-{os.getpid()}-", dir=cache_root))
    try:
        model, tokenizer = load_gguf(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(_source_record(gguf)) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # whole or absent: an interrupted conversion is never used
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"hotmerge: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr,
          flush=True)  # fmt: skip
    return out


def resolve_model(model: str, cache_root: Path) -> str:
    """``model`` itself, or the converted folder when it names a GGUF file (or a folder of one)."""
    gguf = gguf_file(Path(model))
    return model if gguf is None else str(convert_gguf(gguf, cache_root))
