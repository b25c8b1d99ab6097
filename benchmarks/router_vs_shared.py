"""The router's reason to exist, measured: the same machine and the same replicas' worth of CPU
serve a mixed load (a share of long thinking requests, the rest short no-think ones) either as
(a) one shared pool of two replicas that takes everything, or (b) the router's thinking pool and
fast pool, one replica each; and, as the floor, (b) with only the no-think requests (fast_only).
Each is `q3serve up` with its config, loaded by `q3serve bench` with the same seeded requests at
the same arrival times; the figures are the no-think requests' latencies.

    python -m benchmarks.router_vs_shared [--rate 2] [--num-prompts 160] [--rounds 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deployments.tools.machine import describe_machine
from deployments.tools.bench.clients import Record
from deployments.tools.bench.run import BenchConfig, bench
from deployments.tools.bench.summary import summarize_by_mode
from benchmarks.servers import UpServer
from deployments.tools.bench.workload import WorkloadConfig

RESULTS = Path(__file__).parent / "results"


def configs(seqs: int) -> dict[str, dict[str, Any]]:
    """Both layouts on the embedded model: two replicas of one thread each, `seqs` sequences each.
    Routed, the thinking pool keeps its preset's low CPU priority (it runs on what the fast pool
    leaves) and stream_interval 16 (its long streams cost the ingress and proxy a chunk per 16
    tokens); shared, both replicas serve both modes, so neither can yield to the other, and they
    stream every token, as the no-think requests among theirs need."""
    pool = {"max_num_seqs": seqs, "kv_cache_memory_gb": 0.5, "default_max_tokens": 2048, "cpu_threads": 1}
    no_think = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}  # the same sampling for no-think requests in both
    shared = {"thinking": {**pool, "cpu_priority": "normal", "stream_interval": 1, "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
              "fast": {"enabled": False, "sampling_defaults": no_think}}
    routed = {"thinking": {**pool, "cpu_priority": "low", "stream_interval": 16},
              "fast": {**pool, "cpu_priority": "normal", "max_thinking_budget": 0, "sampling_defaults": no_think}}
    return {"shared": shared, "routed": routed}


def no_think(summary: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    s = summary.get("no-think", {})
    return {"requests": s.get("completed", 0), "failed": s.get("failed", 0),
            **{k: s.get(k) for k in ("p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "p50_e2el_ms",
                                     "p99_e2el_ms", "output_throughput")},
            "pools": s.get("pools", {}),
            "p99_ttft_ms_by_round": [r["summary"].get("no-think", {}).get("p99_ttft_ms") for r in rounds]}


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary over the requests of every round (percentiles of all of them, not a mean of p99s)."""
    records = [Record(**r) for run in runs for r in run["records"]]
    return summarize_by_mode(records, sum(run["summary"]["overall"]["duration_s"] for run in runs), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=2.0, help="requests/s, Poisson, both modes together")
    ap.add_argument("--num-prompts", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=2, help="each layout this many times, taking turns")
    ap.add_argument("--thinking-share", type=float, default=0.25)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32, help="no-think requests' output tokens")
    ap.add_argument("--thinking-output-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=32, help="per replica, in both layouts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "router_vs_shared.json"))
    args = ap.parse_args()
    cfgs = configs(args.max_num_seqs)
    result: dict[str, Any] = {
        "machine": describe_machine(), "model": "embedded default (models/q3serve-tiny-thinker)",
        "load": {"rate_req_s": args.rate, "num_prompts": args.num_prompts, "rounds": args.rounds,
                 "thinking_share": args.thinking_share, "input_len": args.input_len,
                 "no_think_output_len": args.output_len, "thinking_output_len": args.thinking_output_len,
                 "ignore_eos": True, "backend": "openai (completions)", "seed": "seed + round"},
        "pools": {"shared": "one pool, 2 replicas x 1 thread, normal CPU priority, max_num_seqs %d each" % args.max_num_seqs,
                  "routed": "thinking pool 1 replica (low CPU priority, stream_interval 16) + fast pool 1 replica "
                            "(normal), 1 thread and max_num_seqs %d each" % args.max_num_seqs,
                  "configs": cfgs},
    }
    layouts = [("fast_only", "routed", "no-think"), ("shared", "shared", None), ("routed", "routed", None)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in layouts}
    for rnd in range(args.rounds):
        workload = WorkloadConfig(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                                  thinking_output_len=args.thinking_output_len, thinking_share=args.thinking_share,
                                  seed=args.seed + rnd)
        for name, cfg_name, only in layouts[rnd % 3:] + layouts[:rnd % 3]:  # a different one goes first each round
            with UpServer(cfgs[cfg_name]) as server:
                bench_cfg = BenchConfig(url=server.url, label=f"{name} round {rnd + 1}", only_mode=only, timeout_s=600,
                                        workload=workload)
                bench_cfg.sampling.ignore_eos = True
                bench(BenchConfig(url=server.url, label="warm-up", workload=WorkloadConfig(num_prompts=4, output_len=8)),
                      [float("inf")], progress=False)
                (run,) = bench(bench_cfg, [args.rate])
            runs[name].append(run)
            print(name, rnd + 1, json.dumps(no_think(run["summary"], [run])), flush=True)
    for name, _, _ in layouts:
        summary = pooled(runs[name])
        result[name] = no_think(summary, runs[name])
        result[f"{name}_thinking"] = {k: summary.get("thinking", {}).get(k) for k in
                                      ("completed", "failed", "p50_ttft_ms", "p50_itl_ms", "output_throughput")}
    r, f, s = result["routed"], result["fast_only"], result["shared"]
    result["checks"] = {
        "routed_p99_ttft_within_1.5x_of_fast_only": r["p99_ttft_ms"] <= 1.5 * f["p99_ttft_ms"],
        "shared_p99_ttft_worse_than_routed": s["p99_ttft_ms"] > r["p99_ttft_ms"],
        "routed_over_fast_only_p99_ttft": round(r["p99_ttft_ms"] / f["p99_ttft_ms"], 3),
        "shared_over_routed_p99_ttft": round(s["p99_ttft_ms"] / r["p99_ttft_ms"], 3),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["checks"]), f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
