"""The kernels' environment switches, read once at import (they sit on every launch's path).
The server's switches are read in ``hotmerge/settings.py``; this package cannot import it.

- ``HOTMERGE_PDL=0``: launch every kernel plainly, without programmatic dependent launch.
- ``TRITON_INTERPRET=1`` (Triton's own switch): kernels run in Triton's interpreter on the CPU;
  they then pick small tiles and float32 dots.
"""

from __future__ import annotations

import os

USE_PDL = os.environ.get("HOTMERGE_PDL", "1") != "0"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
