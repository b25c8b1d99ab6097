"""The device script (benchmarks/decode_floor.py) smoke-runs on the CPU as its GPU run would:
tiny shapes, every variant (the kernel ones in Triton's interpreter), and the JSON a run cut short
would still leave, row by row."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import decode_floor

KEYS = {"variant", "sequences", "step_ms", "floor_ms", "over_floor", "launches", "host_syncs", "max_logit_diff"}


def test_decode_floor_smoke_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "decode_floor.json"
    decode_floor.main(["--device", "cpu", "--layers", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["read_bandwidth_gbs"] > 0 and not result["errors"]
    rows = result["rows"]
    assert {r["variant"] for r in rows} == {"eager", "graphs", "graphs+kernels", "fp8"}
    assert all(KEYS <= set(r) and r["step_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert sorted({r["sequences"] for r in rows}) == [1, 5, 16]  # 5 fills a bucket of 8 with padding
    for r in rows:
        if r["variant"] in ("graphs", "graphs+kernels"):  # float32: the static step and the kernels agree with eager
            assert r["max_logit_diff"] < 1e-3, r
        if r["variant"] == "fp8":  # quantized experts: close, not equal
            assert 0 < r["max_logit_diff"] < 5, r
