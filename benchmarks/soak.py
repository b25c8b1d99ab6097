"""Soak: minutes of mixed load against the Serve application on a local Ray cluster, then the
leak checks. The load mixes thinking (with and without a budget) and no-think chat, streamed and
whole, completions, clients that disconnect mid-stream and bad requests (which must get a 400).
Checks: every pool's KV blocks in use return to zero once idle; the resident memory of every
replica and instance actor returns near its level after warm-up; after shutdown Ray has no live
actor and no placement group left over. Writes benchmarks/results/soak.json.

    python -m benchmarks.soak [--minutes 5] [--clients 8] [--out benchmarks/results/soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx

from deployments.tools.machine import describe_machine

RESULTS = Path(__file__).parent / "results"
APP = "q3serve"
CONFIG = {"thinking": {"attention_shards": 2, "expert_groups": 2, "kv_cache_memory_gb": 0.25},
          "fast": {"kv_cache_memory_gb": 0.25}}
BAD = [  # (body, the field the 400 must name)
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function", "function": {"name": "nope"}},
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema",
      "json_schema": {"name": "s", "schema": {"type": "bogus"}}}}, "response_format"),
]


def processes() -> dict[str, int]:
    """The live actors of the app (pool replicas, the ingress, instance actors): name -> pid."""
    from ray._private.state import actors

    out = {}
    for info in actors().values():
        name = info.get("Name") or ""
        if info["State"] == "ALIVE" and (name.startswith(f"SERVE_REPLICA::{APP}#") or name.startswith("q3serve-")):
            out[name] = info["Pid"]
    return out


def rss_mb(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            out[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            pass
    return out


async def client(http: httpx.AsyncClient, rng: random.Random, until: float, counts: dict[str, int]) -> None:
    """One client: a random kind of request after another until `until`."""
    while time.monotonic() < until:
        kind = rng.choice(["think", "think_budget", "no_think", "no_think_whole", "completion", "disconnect", "bad"])
        body: dict[str, Any] = {"model": "qwen3-moe", "max_tokens": rng.randint(8, 160)}
        msg = [{"role": "user", "content": f"Add {rng.randint(10, 9999)} and {rng.randint(10, 99)}."}]
        try:
            if kind == "bad":
                bad, field = rng.choice(BAD)
                r = await http.post("/v1/chat/completions", json={**body, **bad})
                ok = r.status_code == 400 and (r.json()["error"]["param"] or "").startswith(field)
                counts["bad_refused" if ok else "bad_mishandled"] += 1
                continue
            if kind == "completion":
                r = await http.post("/v1/completions", json={**body, "prompt": msg[0]["content"]})
                counts["ok" if r.status_code == 200 else f"http_{r.status_code}"] += 1
                continue
            thinking = kind.startswith("think")
            body.update(messages=msg, chat_template_kwargs={"enable_thinking": thinking})
            if kind == "think_budget":
                body["thinking_budget"] = rng.randint(0, 32)
            if kind == "no_think_whole":
                r = await http.post("/v1/chat/completions", json=body)
                counts["ok" if r.status_code == 200 else f"http_{r.status_code}"] += 1
                continue
            async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: ")
                    if kind == "disconnect" and n >= 3:
                        break  # leaving the block closes the connection mid-stream
                counts["disconnected" if kind == "disconnect" else
                       ("ok" if r.status_code == 200 else f"http_{r.status_code}")] += 1
        except (httpx.HTTPError, OSError, ValueError) as exc:
            counts[f"error_{type(exc).__name__}"] += 1


async def load(url: str, seconds: float, clients: int, seed: int) -> dict[str, int]:
    from collections import Counter

    counts: Counter = Counter()
    until = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(http, random.Random(seed + i), until, counts) for i in range(clients)))
    return dict(counts)


def idle_stats(timeout_s: float = 60) -> dict[str, dict[str, Any]]:
    """Each pool's stats once nothing runs (or at the timeout)."""
    from ray import serve

    out = {}
    for pool in ("thinking", "fast"):
        handle = serve.get_deployment_handle(f"{pool}-pool", app_name=APP)
        deadline = time.monotonic() + timeout_s
        while True:
            st = handle.stats.remote().result(timeout_s=30)
            if (st["running"] == 0 and st["kv_blocks_free"] == st["kv_blocks_total"]) or time.monotonic() > deadline:
                out[pool] = {k: st[k] for k in ("running", "waiting", "kv_blocks_free", "kv_blocks_total")}
                break
            time.sleep(0.5)
    return out


def main() -> None:
    import ray
    from ray import serve

    from deployments.app import apply_serve_env, build_app
    from deployments.config import AppConfig
    from deployments.api.grpc_api import SERVICER_FUNCTIONS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    apply_serve_env()
    ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False)
    result: dict[str, Any] = {"machine": describe_machine(), "config": CONFIG, "minutes": args.minutes,
                              "clients": args.clients}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port},
                    grpc_options={"port": args.port + 1, "grpc_servicer_functions": SERVICER_FUNCTIONS})
        serve.run(build_app(AppConfig.model_validate(CONFIG)), name=APP, route_prefix="/", blocking=False)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        result["warm_up"] = asyncio.run(load(url, 30, args.clients, args.seed + 1000))
        idle_stats()
        pids = processes()
        before = rss_mb(pids)
        result["load"] = asyncio.run(load(url, args.minutes * 60, args.clients, args.seed))
        result["idle_after"] = idle_stats()
        after = rss_mb(pids)
        result["rss_mb"] = {n: {"after_warm_up": before[n], "after_soak": after.get(n),
                                "growth_pct": round(100 * (after.get(n, 0) - before[n]) / before[n], 1)}
                            for n in before}
        serve.delete(APP)
        serve.shutdown()
        time.sleep(2)
        from ray._private.state import actors

        alive = [a.get("Name") or a["ActorClassName"] for a in actors().values() if a["State"] == "ALIVE"]
        pgs = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        result["after_shutdown"] = {"live_actors": alive, "placement_groups": len(pgs)}
        result["checks"] = {
            "kv_blocks_back_to_free": all(s["kv_blocks_free"] == s["kv_blocks_total"] for s in result["idle_after"].values()),
            "bad_requests_all_refused_with_400": result["load"].get("bad_mishandled", 0) == 0,
            "max_rss_growth_pct": max(v["growth_pct"] for v in result["rss_mb"].values()),
            "nothing_left_after_shutdown": not alive and not pgs,
        }
    finally:
        ray.shutdown()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("checks"), indent=1), f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
