"""Generate the Python gRPC stubs from proto/ into server/ (run by `make proto` and the build).

The stubs are build outputs: never edit them, change the .proto and regenerate.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "server"


def generate() -> None:
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    files = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        *files,
    ]
    if protoc.main(args) != 0:
        sys.exit(f"protoc failed on {files}")


if __name__ == "__main__":
    generate()
