"""Each fault of `q3serve bench --fault` against `q3serve up` serving the embedded model with an
expert-parallel thinking pool (two attention shards, two expert groups) and the fast pool, under
a mixed streaming load: for each, the requests in flight at the fault, completed, failed with a
retriable error, failed otherwise, hung (must be 0), retried, the longest a request took to end
after the fault, and the time until the pool served again. One server for all faults, in turn;
the next fault waits until /health is back. First, overload: many times what the pools hold,
sent at once (429s, their latency, the admitted requests' TTFT), with both pools and with the
thinking pool alone.

    python -m benchmarks.faults [--faults expert-group,stall,...] [--out benchmarks/results/faults.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import httpx

from deployments.tools.machine import describe_machine
from deployments.tools.bench.clients import SamplingArgs
from deployments.tools.bench.faults import FAULTS, FaultConfig
from deployments.tools.bench.run import BenchConfig, bench
from deployments.tools.bench.summary import percentile
from benchmarks.servers import UpServer
from deployments.tools.bench.workload import WorkloadConfig

RESULTS = Path(__file__).parent / "results"
CONFIG = {"thinking": {"attention_shards": 2, "expert_groups": 2, "step_timeout_s": 10},
          "fast": {}}


def wait_healthy(url: str, timeout_s: float = 300) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url}/health not back within {timeout_s}s")


def one(server: UpServer, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    workload = WorkloadConfig(num_prompts=args.num_prompts, input_len=64, output_len=args.output_len,
                              thinking_share=0.5, seed=1)
    cfg = BenchConfig(url=server.url, grpc_target=server.grpc_target, backend="openai-chat", label=kind,
                      request_rate=args.rate, duration_s=120, timeout_s=args.timeout, workload=workload,
                      sampling=SamplingArgs(ignore_eos=True),
                      fault=FaultConfig(kind, at_s=args.fault_at, pool="thinking", recover_timeout_s=240))
    (run,) = bench(cfg, [args.rate], progress=False)
    fault = run["fault"]
    ends = [r["end_s"] - fault["at_s"] for r in run["records"] if r["end_s"] is not None
            and r["start_s"] <= fault["at_s"] <= r["end_s"]]
    fault["longest_end_after_fault_s"] = round(max(ends), 2) if ends else None
    fault["recovered_after_s"] = round(fault["recovered_after_s"], 2) if fault["recovered_after_s"] else None
    fault["at_s"] = round(fault["at_s"], 2)
    fault["health_back_after_run_s"] = round(wait_healthy(server.url), 2)
    fault.pop("pid", None)
    print(json.dumps(fault), flush=True)
    return fault


def overload(server: UpServer, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Many times what the pools hold at once (running + queued), all sent at once: the excess is
    refused with 429 at once; the admitted ones' latency; then the server serves normally again."""
    workload = WorkloadConfig(num_prompts=args.overload_requests, input_len=64, output_len=32, thinking_share=0.5, seed=2)
    cfg = BenchConfig(url=server.url, label=label, request_rate=float("inf"), duration_s=120, timeout_s=300,
                      workload=workload, sampling=SamplingArgs(ignore_eos=True))
    (run,) = bench(cfg, [float("inf")], progress=False)
    records = run["records"]
    refused = [r for r in records if r["status"] == "429"]
    admitted = [r for r in records if r["error"] is None]
    s = run["summary"]["overall"]
    after = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "qwen3-moe", "messages": [{"role": "user", "content": "Add 12 and 30."}], "max_tokens": 64})
    out = {
        "requests": len(records), "admitted_completed": len(admitted), "refused_429": len(refused),
        "failed_other": len(records) - len(admitted) - len(refused),
        **{f"refusal_p{q}_latency_ms": round(percentile([(r["end_s"] - r["start_s"]) * 1000 for r in refused], q), 1)
           if refused else None for q in (50, 90, 100)},
        "admitted_p50_ttft_ms": round(s["p50_ttft_ms"], 1), "admitted_p99_ttft_ms": round(s["p99_ttft_ms"], 1),
        "admitted_p99_e2el_ms": round(s["p99_e2el_ms"], 1), "pools": s["pools"],
        "served_after": after.status_code,
    }
    print(label, json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--fault-at", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="a request still open after this is counted as hung")
    ap.add_argument("--overload-requests", type=int, default=600, help="sent at once in the overload runs (0: none)")
    ap.add_argument("--out", default=str(RESULTS / "faults.json"))
    args = ap.parse_args()
    result: dict[str, Any] = {
        "machine": describe_machine(), "model": "embedded default (models/q3serve-tiny-thinker)", "config": CONFIG,
        "load": {"rate_req_s": args.rate, "num_prompts": args.num_prompts, "thinking_share": 0.5, "input_len": 64,
                 "output_len": args.output_len, "ignore_eos": True, "backend": "openai-chat, streamed",
                 "fault_at_s": args.fault_at, "client_timeout_s": args.timeout},
        "faults": {},
    }
    out = Path(args.out)
    with UpServer(CONFIG) as server:
        if args.overload_requests:
            result["overload"] = {"both_pools": overload(server, args, "overload, both pools")}
            wait_healthy(server.url)
        for kind in filter(None, args.faults.split(",")):
            result["faults"][kind] = one(server, kind, args)
            out.write_text(json.dumps(result, indent=2) + "\n")
        _leave_cluster()  # the injector joined the server's Ray cluster; it stops with the server
    if args.overload_requests:
        with UpServer({"fast": {"enabled": False}}) as server:
            result["overload"]["thinking_pool_only"] = overload(server, args, "overload, thinking pool only")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def _leave_cluster() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    main()
