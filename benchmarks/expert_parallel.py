"""Expert-parallel path: output tokens/s of (attention shards, expert groups) = (1, 1) in
process, (1, 1) / (1, 2) / (2, 2) as Ray actors exchanging tokens by gloo all_to_all, on the
same checkpoint and load, with each step's time split into compute, dispatch/combine (time in
collectives beyond the experts' own compute) and control (engine-to-actor round trips,
scheduling, pickling plans).

    python -m benchmarks.expert_parallel [--concurrency 16] [--out PATH]

On 2 CPU cores parallelism cannot speed this up: the figures show what the exchange costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import ray
import torch

from benchmarks.engine_throughput import MODELS, make_checkpoint, prompts
from cluster import LLM, SamplingParams

OUTPUT_LEN = 64
LAYOUTS = [("local", 1, 1), ("ray", 1, 1), ("ray", 1, 2), ("ray", 2, 2)]


def run(path: Path, mode: str, shards: int, groups: int, batch: list[list[int]], threads: int = 1) -> dict:
    llm = LLM(path, dtype="float32", attention_shards=shards, expert_groups=groups, use_ray=mode == "ray",
              max_num_seqs=64, max_num_batched_tokens=4096, enable_prefix_caching=False, torch_threads=threads)
    core = llm.core
    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    llm.generate(batch[:2], params)  # warm-up
    ex = core.executor
    if mode == "ray":
        ex.call_all("exchange_stats", True)
    for p in batch:
        core.add_request(p, params)
    steps, wall = 0, 0.0
    decode_steps, decode_wall = 0, 0.0
    while core.has_work():
        t = time.perf_counter()
        core.step()
        dt = time.perf_counter() - t
        wall += dt
        steps += 1
        if steps > 1:  # the first step is the prefill of every prompt
            decode_steps += 1
            decode_wall += dt
    row = {"layout": f"{mode} A={shards} E={groups}", "attention_shards": shards, "expert_groups": groups,
           "tok_s": round(len(batch) * OUTPUT_LEN / wall, 1), "steps": steps,
           "decode_step_ms": round(1e3 * decode_wall / decode_steps, 3)}
    if mode == "ray":
        shard_stats = ex.call_all("exchange_stats", actors=ex.shards)
        group_stats = ex.call_all("exchange_stats", actors=ex.groups)
        shard_s = max(s["step_s"] for s in shard_stats)
        comm_s = max(s["comm_s"] for s in shard_stats)
        experts_s = max(g["experts_s"] for g in group_stats)
        exchange = max(0.0, comm_s - experts_s)
        row["per_step_ms"] = {
            "compute": round(1e3 * (shard_s - exchange) / steps, 3),
            "dispatch_combine": round(1e3 * exchange / steps, 3),
            "control": round(1e3 * (wall - shard_s) / steps, 3),
        }
        row["detail_ms_per_step"] = {
            "shard_outside_collectives": round(1e3 * (shard_s - comm_s) / steps, 3),
            "shard_in_collectives": round(1e3 * comm_s / steps, 3),
            "group_expert_matmuls": round(1e3 * experts_s / steps, 3),
        }
        row["exchange_mb_per_step"] = round(sum(sum(s["hidden_bytes"]) + sum(s["index_bytes"]) for s in shard_stats) / steps / 1e6, 3)
    else:
        row["per_step_ms"] = {"compute": round(1e3 * wall / steps, 3), "dispatch_combine": 0.0, "control": 0.0}
    llm.shutdown()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--actor-threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "expert_parallel.json"))
    args = ap.parse_args()
    ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False)
    result: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                    "torch": torch.__version__, "ray": ray.__version__, "backend": "gloo"},
        "model": "a (hidden 256, 4 layers, 16 experts top-4, vocab 4096), float32",
        "concurrency": args.concurrency, "prompt_len": 64, "output_len": OUTPUT_LEN,
        "threads": f"in-process engine: {torch.get_num_threads()} intra-op threads; each actor: {args.actor_threads}", "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "a", MODELS["a"])
        batch = prompts(args.concurrency, MODELS["a"]["vocab_size"])
        for mode, a, e in LAYOUTS:
            row = run(path, mode, a, e, batch, args.actor_threads)
            print(json.dumps(row), flush=True)
            result["runs"].append(row)
    local = result["runs"][0]["decode_step_ms"]
    for row in result["runs"][1:]:
        row["decode_step_ms_beyond_local"] = round(row["decode_step_ms"] - local, 3)
    ray.shutdown()
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
