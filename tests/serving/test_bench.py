"""`q3serve bench` against a running app for a few seconds, over each API (HTTP completions and
chat, gRPC Generate and Chat), with a mixed thinking / no-think load: the JSON has every field
vLLM's benchmark reports, the counts add up per mode and overall, the percentiles are ordered,
and each request went to its mode's pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.tools.bench.run import BenchConfig, bench
from deployments.tools.bench.summary import METRICS, PERCENTILES
from deployments.tools.bench.workload import WorkloadConfig
from tests.helpers.serving import GRPC_PORT, ServeApp

FIELDS = ["num_requests", "completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
          "request_throughput", "output_throughput", "total_token_throughput", "request_goodput", "pools"]


@pytest.fixture(scope="module")
def server(serve_app: ServeApp) -> str:
    return serve_app()


def _check_run(run: dict, n: int, max_output: int, chat: bool) -> None:
    summary, records = run["summary"], run["records"]
    overall = summary["overall"]
    for f in FIELDS:
        assert f in overall, f
    for m in METRICS:
        for stat in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES)):
            assert f"{stat}_{m}_ms" in overall
        ps = [overall[f"p{p}_{m}_ms"] for p in PERCENTILES]
        assert ps == sorted(ps) and ps[0] > 0, (m, ps)
    assert overall["num_requests"] == n == len(records) + run["not_sent"] and run["not_sent"] == 0
    assert overall["failed"] == 0, overall["errors"]
    assert set(summary) == {"overall", "thinking", "no-think"}
    for key in ("num_requests", "completed", "total_output_tokens", "total_input_tokens"):
        assert summary["thinking"][key] + summary["no-think"][key] == overall[key]
    assert overall["total_output_tokens"] == sum(r["output_tokens"] for r in records)
    assert sum(overall["pools"].values()) == overall["completed"]
    assert overall["good_requests"] <= overall["completed"]
    for r in records:
        assert 0 < r["ttft_s"] <= r["e2el_s"] and r["prompt_tokens"] > 0
        assert 1 <= r["output_tokens"] <= max_output and r["finish_reason"] in ("length", "stop")
        assert len(r["itl_s"]) <= r["output_tokens"] - 1
        # Routing: no-think requests to the fast pool, thinking ones to the thinking pool.
        assert r["pool"] == ("thinking" if r["mode"] == "thinking" else "fast"), r
        if r["mode"] == "thinking" and chat and r["budget"] is not None:
            assert r["reasoning_tokens"] <= r["budget"] + 1


@pytest.mark.parametrize("backend", ["openai", "openai-chat", "grpc", "grpc-chat"])
def test_bench_each_api(server: str, backend: str) -> None:
    n, output_len = 12, 8
    cfg = BenchConfig(url=server, grpc_target=f"127.0.0.1:{GRPC_PORT['port']}", backend=backend, model="m",
                      max_concurrency=4, duration_s=60, timeout_s=120, slos={"ttft": 60_000},
                      workload=WorkloadConfig(num_prompts=n, input_len=16, output_len=output_len, range_ratio=0.5,
                                              thinking_share=0.5, thinking_budgets=(4, None), seed=3))
    cfg.sampling.ignore_eos = backend != "grpc-chat"
    runs = bench(cfg, [8.0], progress=False)
    assert len(runs) == 1
    _check_run(runs[0], n, int(output_len * 1.5), chat=backend.endswith("chat"))  # lengths within +-50%
    assert runs[0]["summary"]["overall"]["p50_itl_ms"] > 0


def test_bench_command_sweep_writes_json_and_plots(server: str, tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "deployments.cli", "bench", "--url", server, "--backend", "openai",
           "--request-rate", "4,16", "--num-prompts", "6", "--input-len", "8", "--output-len", "6", "--ignore-eos",
           "--thinking-share", "0.5", "--goodput", "ttft:60000", "tpot:60000", "--out", str(out), "--plot", str(png),
           "--no-progress", "--duration", "60", "--timeout", "120"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"] and [r["config"]["request_rate"] for r in result["runs"]] == [4.0, 16.0]
    for r in result["runs"]:
        _check_run(r, 6, 6, chat=False)
        assert all(rec["output_tokens"] == 6 for rec in r["records"])  # ignore_eos: every request runs to its length
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "bench-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_command_writes_where_a_user_runs_it(server: str, tmp_path: Path) -> None:
    """Run from a directory of the user's (an installed q3serve has no benchmarks/ folder): the
    JSON goes to ./q3serve-bench.json and its plot beside it, unless --out / --plot say otherwise."""
    cmd = [sys.executable, "-m", "deployments.cli", "bench", "--url", server, "--backend", "openai",
           "--num-prompts", "2", "--input-len", "8", "--output-len", "4", "--no-progress", "--duration", "60",
           "--timeout", "120"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "q3serve-bench.json").read_text())["runs"]
    assert (tmp_path / "q3serve-bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
