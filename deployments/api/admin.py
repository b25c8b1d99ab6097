"""Operator routes under /admin (behind the API keys, like /v1): a pool's live expert usage, in
the file format `q3serve experts prune | place` read, and a live re-plan of its expert
placement from those counters. Both reach every replica of the pool (Serve's handle broadcast):
the usage is the replicas' counters added, and the re-plan gives every replica the one map made
from them, so a pool's replicas stay alike."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from cluster import ExpertUsage, RequestError
from deployments.api.http import REQUEST_CODES, documented, error
from deployments.frontend import Frontend


class ReplanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    redundant: int = Field(0, ge=0)  # extra copies of the hottest experts per layer


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc  # a replica's own error, not Ray's wrapper


async def _on_every_replica(handle: Any, method: str, timeout_s: float, *args: Any) -> list[Any]:
    """`method` on every replica of a pool at once; past `timeout_s` a TimeoutError (a 504)."""
    return await handle.broadcast(method, *args).results_async(timeout_s=timeout_s)


def pool_usage(readings: list[dict[str, Any]], pool: str) -> ExpertUsage:
    """The replicas' counters (ModelPool.expert_usage answers) added into one usage file that
    names them."""
    usages = [ExpertUsage(**r["usage"]) for r in readings]
    total = usages[0]
    for u in usages[1:]:
        total = total.plus(u)
    names = ", ".join(r["replica"] for r in readings)
    return dataclasses.replace(total, source=f"pool {pool}, {len(usages)} replica(s) ({names}), live counters")


def add_admin_routes(app: FastAPI, frontend: Frontend, usage_timeout_s: float = 60.0,
                     replan_timeout_s: float = 900.0) -> None:
    def handle(pool: str) -> Any:
        h = frontend.router.handles.get(pool)
        if h is None:
            raise LookupError(f"pool: no pool named {pool!r}; this app has {', '.join(sorted(frontend.router.handles))}")
        return h

    @app.get("/admin/experts/{pool}", responses=documented(401, 404, 503, 504))
    async def expert_usage(pool: str) -> Any:
        try:
            readings = await _on_every_replica(handle(pool), "expert_usage", usage_timeout_s)
        except LookupError as exc:
            return error(404, str(exc), "pool")
        except (asyncio.TimeoutError, TimeoutError):
            return error(504, f"pool {pool} did not answer within {usage_timeout_s:g}s", "pool")
        if not readings:
            return error(503, f"pool {pool} has no running replica", "pool")
        return dataclasses.asdict(pool_usage(readings, pool))

    @app.post("/admin/experts/{pool}/replan", responses=documented(*REQUEST_CODES, 503, 504))
    async def replan(pool: str, body: ReplanRequest) -> Any:
        try:
            h = handle(pool)
            readings = await _on_every_replica(h, "expert_usage", usage_timeout_s)
            if not readings:
                return error(503, f"pool {pool} has no running replica", "pool")
            usage = pool_usage(readings, pool)
            moved = await _on_every_replica(h, "replan", replan_timeout_s, body.redundant, usage.tokens)
        except LookupError as exc:
            return error(404, str(exc), "pool")
        except (asyncio.TimeoutError, TimeoutError):
            return error(504, f"pool {pool} did not finish the re-plan within {replan_timeout_s:g}s", "pool")
        except RequestError as exc:
            return error(400, str(_cause(exc)), getattr(_cause(exc), "param", None))
        first = moved[0]
        return {"pool": pool, "usage": usage.source, "groups": first["groups"], "before": first["before"],
                "after": first["after"], "placement": first["placement"],
                "replicas": [{"replica": m["replica"], "seconds": m["seconds"], "layers_reloaded": m["layers_reloaded"],
                              "same_map": m["placement"] == first["placement"]} for m in moved]}
