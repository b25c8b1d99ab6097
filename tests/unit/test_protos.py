"""The committed gRPC stubs are what grpcio-tools generates from the committed .proto."""

from __future__ import annotations

from pathlib import Path

from protos.generate import ROOT, generate


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted((tmp_path / "protos" / "q3serve" / "v1").glob("*_pb2*.py*"))
    assert {p.name for p in fresh} == {"q3serve_pb2.py", "q3serve_pb2.pyi", "q3serve_pb2_grpc.py"}
    for f in fresh:
        committed = ROOT / "protos" / "q3serve" / "v1" / f.name
        assert committed.read_text() == f.read_text(), f"{committed} is stale: run python -m protos.generate"
