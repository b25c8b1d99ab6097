"""A live expert re-plan while the benchmark's load runs: at `at_s` the pool is asked (the
admin API, `POST /admin/experts/{pool}/replan`) to move to a load-balanced placement computed
from its live counters; the run records how long the move took, what it changed, and how many
requests failed around it (none should)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class ReplanConfig:
    at_s: float = 5.0
    pool: str = "thinking"
    redundant: int = 0
    timeout_s: float = 600.0


async def run_replan(cfg: ReplanConfig, http: httpx.AsyncClient, t0: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + cfg.at_s - time.perf_counter()))
    start = time.perf_counter()
    try:
        r = await http.post(f"/admin/experts/{cfg.pool}/replan", json={"redundant": cfg.redundant}, timeout=cfg.timeout_s)
        body = r.json()
        status = r.status_code
    except (httpx.HTTPError, ValueError) as exc:
        body, status = {"error": f"{type(exc).__name__}: {exc}"[:300]}, None
    out = {"pool": cfg.pool, "redundant": cfg.redundant, "at_s": start - t0, "took_s": time.perf_counter() - start,
           "status": status}
    if status == 200:
        out.update({k: body[k] for k in ("usage", "before", "after", "replicas")})
    else:
        out["error"] = body.get("error", body)
    return out


def around(records: list[Any], replan: dict[str, Any]) -> dict[str, int]:
    """Requests in flight while the move ran, and how they ended."""
    lo, hi = replan["at_s"], replan["at_s"] + replan["took_s"]
    during = [r for r in records if r.start_s is not None and r.start_s < hi and (r.end_s or hi) > lo]
    return {"in_flight": len(during), "completed": sum(r.error is None for r in during),
            "failed": sum(r.error is not None for r in during)}
