"""Generates the Python gRPC stubs from proto/ into specdec/v1/ (committed, never edited by hand).

`make proto` runs it after a change to proto/; tests/test_layering.py checks the committed stubs match.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"


def generate(root: Path = ROOT) -> None:
    """Writes the stubs under root/specdec/v1."""
    from grpc_tools import protoc

    out_dir = root / "specdec" / "v1"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "__init__.py").write_text('"""Generated from proto/specdec/v1 by specdec.wire.protos."""\n')
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "specdec" / "v1").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={root}",
                        f"--grpc_python_out={root}", f"--pyi_out={root}", *sources])
    if code != 0:
        sys.exit(f"protoc failed with exit code {code}")


if __name__ == "__main__":
    generate()
