"""The committed gRPC stubs are what grpcio-tools generates from the committed .proto, and the
package's version pins are what those stubs need."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from protos.generate import ROOT, generate


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted((tmp_path / "protos" / "q3serve" / "v1").glob("*_pb2*.py*"))
    assert {p.name for p in fresh} == {"q3serve_pb2.py", "q3serve_pb2.pyi", "q3serve_pb2_grpc.py"}
    for f in fresh:
        committed = ROOT / "protos" / "q3serve" / "v1" / f.name
        assert committed.read_text() == f.read_text(), f"{committed} is stale: run python -m protos.generate"


def test_declared_versions_match_the_stubs() -> None:
    """The stubs refuse to import under a grpcio older than the one that generated them, and under
    a protobuf of another major or older than its own: the package's floors say so, and the test
    extra pins the grpcio-tools that regenerates them byte for byte (a newer patch release stamps
    another version, and the staleness test above fails on a fresh install)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0]: d for d in project["dependencies"] + project["optional-dependencies"]["test"]}
    stubs = ROOT / "protos" / "q3serve" / "v1"
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", (stubs / "q3serve_pb2_grpc.py").read_text())[1]
    major, minor, patch = re.search(r"Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", (stubs / "q3serve_pb2.py").read_text()).groups()
    assert deps["grpcio-tools"] == f"grpcio-tools=={grpc_version}"
    assert deps["grpcio"] == f"grpcio>={grpc_version}"
    assert deps["protobuf"] == f"protobuf>={major}.{minor}.{patch},<{int(major) + 1}"
