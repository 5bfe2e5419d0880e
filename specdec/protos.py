"""Generates the Python gRPC stubs from proto/ into specdec/v1/ (never edited by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "specdec" / "v1"


def generate() -> None:
    from grpc_tools import protoc

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "__init__.py").write_text('"""Generated from proto/specdec/v1 by specdec.protos."""\n')
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "specdec" / "v1").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={ROOT}",
                        f"--grpc_python_out={ROOT}", f"--pyi_out={ROOT}", *sources])
    if code != 0:
        sys.exit(f"protoc failed with exit code {code}")


if __name__ == "__main__":
    generate()
