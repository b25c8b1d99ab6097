"""Operator routes under /admin (behind the API keys, like /v1): a pool's live expert usage, in
the file format `q3serve experts prune | place` read, and a live re-plan of its expert
placement from those counters. Each call reaches one replica of the pool (Serve picks it), and
says which one."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cluster import RequestError
from deployments.frontend import Frontend


class ReplanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    redundant: int = Field(0, ge=0)  # extra copies of the hottest experts per layer


def _error(status: int, message: str, param: str | None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": status}}, status_code=status)


async def _bounded(call: Any, timeout_s: float) -> Any:
    """A pool call that cannot hang the route: past `timeout_s` it is a 504."""
    async def wait() -> Any:
        return await call

    return await asyncio.wait_for(wait(), timeout_s)


def add_admin_routes(app: FastAPI, frontend: Frontend, usage_timeout_s: float = 60.0,
                     replan_timeout_s: float = 900.0) -> None:
    def handle(pool: str) -> Any:
        h = frontend.router.handles.get(pool)
        if h is None:
            raise LookupError(f"pool: no pool named {pool!r}; this app has {', '.join(sorted(frontend.router.handles))}")
        return h

    @app.get("/admin/experts/{pool}")
    async def expert_usage(pool: str) -> Any:
        try:
            return await _bounded(handle(pool).expert_usage.remote(), usage_timeout_s)
        except LookupError as exc:
            return _error(404, str(exc), "pool")
        except asyncio.TimeoutError:
            return _error(504, f"pool {pool} did not answer within {usage_timeout_s:g}s", "pool")

    @app.post("/admin/experts/{pool}/replan")
    async def replan(pool: str, body: ReplanRequest) -> Any:
        try:
            return await _bounded(handle(pool).replan.remote(body.redundant), replan_timeout_s)
        except LookupError as exc:
            return _error(404, str(exc), "pool")
        except asyncio.TimeoutError:
            return _error(504, f"pool {pool} did not finish the re-plan within {replan_timeout_s:g}s", "pool")
        except RequestError as exc:
            cause = getattr(exc, "cause", None) or exc  # the replica's own error, not Ray's wrapper
            return _error(400, str(cause), getattr(cause, "param", None))
