"""The environment switches of the server and its CLI: every ``HOTMERGE_*`` variable the server
package reads is read here, and nowhere else.

| variable | default | what it does |
| --- | --- | --- |
| ``HOTMERGE_DATA_DIR`` | ``data`` | where ``serve`` builds the embedded default model |
| ``HOTMERGE_ADAPTER_ROOT`` | ``.`` | ``hotmerge export``'s adapter folder |
| ``HOTMERGE_TARGET`` | ``localhost:50051`` | the server the CLI's client commands call |
| ``HOTMERGE_API_KEY`` | unset | the API key the CLI's client commands send |
| ``HOTMERGE_EMBEDDED`` | ``smollm2`` | the embedded default: ``smollm2`` or ``tiny`` (random) |

The kernels package cannot import the server, so its own switches (``HOTMERGE_TRITON``,
``HOTMERGE_PDL``, and ``TRITON_INTERPRET`` as Triton reads it) are read in
``hotmerge_kernels/backend.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "HOTMERGE_DATA_DIR"
ADAPTER_ROOT_ENV = "HOTMERGE_ADAPTER_ROOT"
TARGET_ENV = "HOTMERGE_TARGET"
API_KEY_ENV = "HOTMERGE_API_KEY"
EMBEDDED_ENV = "HOTMERGE_EMBEDDED"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


def adapter_root() -> str | None:
    return os.environ.get(ADAPTER_ROOT_ENV) or None


def target(default: str) -> str:
    return os.environ.get(TARGET_ENV, default)


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def embedded_kind() -> str | None:
    return os.environ.get(EMBEDDED_ENV) or None
