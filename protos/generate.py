"""Regenerates the Python stubs from protos/q3serve/v1/*.proto with grpcio-tools:

    python -m protos.generate            # writes next to the .proto files
    python -m protos.generate --out DIR  # elsewhere (the staleness test compares the two)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root: imports say protos.q3serve.v1


def generate(out: Path = ROOT) -> list[Path]:
    from grpc_tools import protoc

    sources = sorted((ROOT / "protos" / "q3serve" / "v1").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    for src in sources:
        rel = src.relative_to(ROOT)
        code = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}",
                            f"--grpc_python_out={out}", f"--pyi_out={out}", str(rel)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {rel} (exit {code})")
    return sources


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT)
    args = ap.parse_args()
    for src in generate(args.out):
        print(f"generated stubs for {src.relative_to(ROOT)} under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
