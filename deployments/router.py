"""Router: picks the pool for a request (thinking -> thinking pool, else fast), applies that
pool's limits (max_tokens, thinking budget), and spills over to the other pool when the chosen
one has no running replica or refuses the request (queue full, replica lost)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from deployments.config import AppConfig, PoolConfig

_REFUSALS = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError, ActorUnavailableError, RayActorError)


class RequestError(ValueError):
    """A request the pools cannot take; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PoolsUnavailable(RuntimeError):
    """No pool could serve the request (503 / UNAVAILABLE)."""


class Overloaded(RuntimeError):
    """Every pool that could serve the request has a full queue (429 / RESOURCE_EXHAUSTED)."""


def pool_order(cfg: AppConfig, thinking: bool) -> list[str]:
    first, second = ("thinking", "fast") if thinking else ("fast", "thinking")
    pools = cfg.pools()
    order = [p for p in (first,) if p in pools]
    if cfg.router.spill_over or not order:
        order += [p for p in (second,) if p in pools]
    return order


def apply_limits(pool: PoolConfig, params: dict[str, Any], thinking: bool) -> dict[str, Any]:
    """The pool's defaults for what the request left out, its caps for what it asked."""
    out = dict(params)
    max_tokens = out.get("max_tokens")
    if max_tokens is None:
        out["max_tokens"] = pool.default_max_tokens
    elif max_tokens > pool.max_tokens_limit:
        raise RequestError(f"max_tokens: {max_tokens} exceeds this pool's limit of {pool.max_tokens_limit}", "max_tokens")
    budget = out.get("thinking_budget")
    if not thinking:
        out["thinking_budget"] = None
    else:
        if budget is None:
            budget = pool.default_thinking_budget
        if budget is not None and pool.max_thinking_budget is not None:
            budget = min(budget, pool.max_thinking_budget)
        elif budget is None:
            budget = pool.max_thinking_budget
        out["thinking_budget"] = budget
    return out


class PoolRouter:
    def __init__(self, cfg: AppConfig, handles: dict[str, Any], app_name: str) -> None:
        self.cfg = cfg
        self.handles = handles
        self.app_name = app_name
        self._running: dict[str, tuple[float, int]] = {}

    def running_replicas(self, pool: str) -> int:
        """Replicas of a pool in RUNNING state (cached for a second: it asks the controller)."""
        now = time.monotonic()
        cached = self._running.get(pool)
        if cached and now - cached[0] < 1.0:
            return cached[1]
        count = 0
        app = serve.status().applications.get(self.app_name)
        if app is not None:
            dep = app.deployments.get(f"{pool}-pool")
            if dep is not None:
                count = dep.replica_states.get("RUNNING", 0)
        self._running[pool] = (now, count)
        return count

    async def stream(self, prompt: str | list[int], params: dict[str, Any], thinking: bool, request_id: str
                     ) -> tuple[str, AsyncIterator[dict[str, Any]]]:
        """Starts the request on the first pool that takes it; returns the pool's name and the
        stream of its chunks."""
        refused: list[str] = []
        overloaded = False
        order = pool_order(self.cfg, thinking)
        for name in order:
            pool = self.cfg.pools()[name]
            limited = apply_limits(pool, params, thinking)
            if len(order) > 1 and self.running_replicas(name) == 0:
                refused.append(f"{name}: no running replica")
                continue
            gen = self.handles[name].options(stream=True).generate.remote(
                {"prompt": prompt, "params": limited, "request_id": request_id}
            )
            try:
                first = await gen.__anext__()
            except _REFUSALS as exc:
                overloaded = overloaded or isinstance(exc, BackPressureError)
                refused.append(f"{name}: {type(exc).__name__}")
                continue
            return name, _chain(first, gen)
        if overloaded:
            raise Overloaded(f"all pools are at their queue limit ({'; '.join(refused)})")
        raise PoolsUnavailable(f"no pool could serve the request ({'; '.join(refused) or 'none enabled'})")

    async def ready(self) -> dict[str, bool]:
        """Per pool: does it have a running, healthy replica?"""
        out = {}
        for name in self.cfg.pools():
            try:
                out[name] = self.running_replicas(name) > 0 and await self.handles[name].ready.remote()
            except Exception:  # noqa: BLE001 - any failure means not ready
                out[name] = False
        return out


async def _chain(first: dict[str, Any], rest: Any) -> AsyncIterator[dict[str, Any]]:
    """The first chunk, then the rest; closing early (a client that went away) cancels the
    request on the pool, which aborts it in the engine and frees its KV blocks."""
    finished = first.get("finished", False)
    try:
        yield first
        async for chunk in rest:
            finished = chunk.get("finished", False)
            yield chunk
    finally:
        if not finished:
            rest.cancel()
