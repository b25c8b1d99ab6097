"""Router: the pool choice. A request's mode picks the pool (thinking -> thinking pool, else
fast), that pool's limits apply (max_tokens, thinking budget), and the request spills over to
the other pool when the chosen one has no running replica or refuses it (queue full, replica
lost). A request whose replica or model instance fails before its first token is retried (on
the pool again, then the other one): nothing reached the client, so nothing is repeated. Once a
token went out, a failure ends the stream with `InstanceLost` (503 / UNAVAILABLE, retriable).
`pool_order` and `apply_limits` are pure functions; `PoolRouter` talks to Serve."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from ray.exceptions import ActorUnavailableError, RayActorError, TaskCancelledError
from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from cluster import EngineDeadError, RequestError, RequestOutput, SamplingParams
from deployments.config import AppConfig, PoolConfig
from deployments.pool import PoolRequest
from deployments.replica_counts import ReplicaCounts

# The pool could not take the request: its queue is full or it has no replica to give it to.
_REFUSALS = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
# The replica or its model instance failed (an actor died, a step stalled past the watchdog, the
# replica's process is gone): Ray hands the replica's EngineDeadError back as an instance of it.
_FAILURES = (EngineDeadError, RayActorError, ActorUnavailableError, TimeoutError)


class PoolsUnavailable(RuntimeError):
    """No pool could serve the request (503 / UNAVAILABLE)."""


class Overloaded(RuntimeError):
    """Every pool that could serve the request has a full queue (429 / RESOURCE_EXHAUSTED)."""


class InstanceLost(PoolsUnavailable):
    """The replica or model instance serving a request failed after its first token went out
    (503 / UNAVAILABLE: the client may retry the whole request)."""


class _ReplicaGone(RuntimeError):
    """The pool a request waits on has no running replica any more."""


class Routed(NamedTuple):
    """A started request: the pool serving it, its outputs, and how many failed starts came first."""

    pool: str
    chunks: AsyncIterator[RequestOutput]
    retries: int = 0


def pool_order(cfg: AppConfig, thinking: bool) -> list[str]:
    first, second = ("thinking", "fast") if thinking else ("fast", "thinking")
    pools = cfg.pools()
    order = [p for p in (first,) if p in pools]
    if cfg.router.spill_over or not order:
        order += [p for p in (second,) if p in pools]
    return order


def apply_limits(pool: PoolConfig, params: SamplingParams, thinking: bool) -> SamplingParams:
    """The pool's defaults for what the request left out, its caps for what it asked."""
    max_tokens = params.max_tokens
    if max_tokens is None:
        max_tokens = pool.default_max_tokens
    elif max_tokens > pool.max_tokens_limit:
        raise RequestError("max_tokens", f"{max_tokens} exceeds this pool's limit of {pool.max_tokens_limit}")
    budget = params.thinking_budget
    if not thinking:
        budget = None
    else:
        if budget is None:
            budget = pool.default_thinking_budget
        if budget is not None and pool.max_thinking_budget is not None:
            budget = min(budget, pool.max_thinking_budget)
        elif budget is None:
            budget = pool.max_thinking_budget
    return dataclasses.replace(params, max_tokens=max_tokens, thinking_budget=budget)


def in_process_transport(handle: Any) -> Any:
    """The handle on the transport this process is set for (deployments/app.py SERVE_PROCESS_ENV).
    A handle bound in the driver keeps the transport the driver's Serve chose when it was first
    imported, before `q3serve up` (or a test) set the environment; the ingress's calls to its pools
    are the ones that count (every request, every streamed chunk). Serve's own reading of the
    setting in this process decides, as it does for handles made here."""
    return handle.options(_by_reference=not RAY_SERVE_USE_GRPC_BY_DEFAULT)


class PoolRouter:
    def __init__(self, cfg: AppConfig, handles: dict[str, Any], app_name: str) -> None:
        self.cfg = cfg
        self.handles = {name: in_process_transport(h) for name, h in handles.items()}
        self.app_name = app_name
        self._replicas = ReplicaCounts(app_name)
        self._open: set[Any] = set()      # the pool streams of requests in flight
        self._ending: str | None = None   # why open streams were cancelled (a drain past its grace)

    def running_replicas(self, pool: str) -> int | None:
        """Replicas of a pool in RUNNING state as last reported (None: not known yet); never
        blocks the event loop (see deployments.replica_counts)."""
        return self._replicas.get(f"{pool}-pool")

    async def stream(self, request: PoolRequest) -> Routed:
        """Starts the request on the first pool that takes it. A pool that refuses it is passed
        over; a replica that fails before the first chunk is retried `router.retries_per_pool` times
        (Serve may route the retry to the same broken replica until its health check removes it),
        then the next pool is tried. Raises RequestError (the pool refused its content), Overloaded
        or PoolsUnavailable."""
        refused: list[str] = []
        overloaded = False
        retries = 0
        order = pool_order(self.cfg, request.thinking)
        for name in order:
            pool = self.cfg.pools()[name]
            limited = dataclasses.replace(request, params=apply_limits(pool, request.params, request.thinking))
            if len(order) > 1 and self.running_replicas(name) == 0:
                refused.append(f"{name}: no running replica")
                continue
            for _ in range(self.cfg.router.retries_per_pool + 1):
                gen = self.handles[name].options(stream=True).generate.remote(limited)
                self._open.add(gen)  # queued for a replica or a first token: a drain's end cancels it too
                try:
                    first = await self._first_chunk(name, gen, watch=len(order) > 1)
                except TaskCancelledError:
                    if self._ending is None:
                        raise
                    raise PoolsUnavailable(f"retry the request: {self._ending}") from None
                except _ReplicaGone:
                    refused.append(f"{name}: its replicas went away")
                    break
                except _REFUSALS as exc:
                    overloaded = overloaded or isinstance(exc, BackPressureError)
                    refused.append(f"{name}: {type(exc).__name__}")
                    break
                except _FAILURES as exc:
                    refused.append(f"{name}: {_why(exc)}")
                    retries += 1
                    continue
                except ValueError as exc:  # raised in the replica: Ray hands back the original as `cause`
                    cause = getattr(exc, "cause", exc)
                    raise cause if isinstance(cause, RequestError) else RequestError(None, str(cause)) from None
                finally:
                    self._open.discard(gen)
                return Routed(name, self._chain(name, first, gen), retries)
        if overloaded:
            raise Overloaded(f"all pools are at their queue limit ({'; '.join(refused)})")
        raise PoolsUnavailable(f"no pool could serve the request ({'; '.join(refused) or 'none enabled'})")

    async def _first_chunk(self, name: str, gen: Any, watch: bool, poll_s: float = 1.0) -> RequestOutput:
        """The stream's first chunk. With another pool to go to (`watch`), a pool left without a
        running replica (its only one died) is not waited on: Serve would hold the request until
        a new replica is built, which takes a while; raises _ReplicaGone instead."""
        if not watch:
            return await gen.__anext__()
        task = asyncio.ensure_future(gen.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=poll_s)
                if done:
                    return task.result()
                if self.running_replicas(name) == 0:
                    raise _ReplicaGone(name)
        finally:
            if not task.done():
                task.cancel()
                gen.cancel()

    async def ready(self) -> dict[str, bool]:
        """Per pool: does it have a running, healthy replica?"""
        out = {}
        for name in self.cfg.pools():
            try:
                out[name] = await self._replicas.known(f"{name}-pool") > 0 and await self.handles[name].ready.remote()
            except Exception:  # noqa: BLE001 - any failure means not ready
                out[name] = False
        return out

    def end_open_requests(self, why: str) -> int:
        """Cancels every request still streaming or waiting for its first chunk (on its replica
        too, which frees its KV blocks): a streaming one ends with InstanceLost(`why`), one that
        sent nothing yet with PoolsUnavailable (HTTP 503 / UNAVAILABLE); both retriable. Returns
        how many there were."""
        self._ending = why
        streams = list(self._open)
        for gen in streams:
            gen.cancel()
        return len(streams)

    async def _chain(self, pool: str, first: RequestOutput, rest: Any) -> AsyncIterator[RequestOutput]:
        """The first chunk, then the rest; closing early (a client that went away) cancels the
        request on the pool, which aborts it in the engine and frees its KV blocks. A failure of
        the replica or its instance after the first chunk becomes InstanceLost."""
        finished = first.finished
        self._open.add(rest)
        try:
            yield first
            try:
                async for chunk in rest:
                    finished = chunk.finished
                    yield chunk
            except TaskCancelledError:
                if self._ending is None:
                    raise
                finished = True
                raise InstanceLost(f"retry the request: {self._ending}") from None
            except (*_FAILURES, *_REFUSALS) as exc:
                finished = True
                raise InstanceLost(f"retry the request: the {pool} pool's replica serving it failed mid-stream "
                                   f"({_why(exc)})") from None
        finally:
            self._open.discard(rest)
            if not finished:
                rest.cancel()


def _why(exc: BaseException) -> str:
    """A failure in one line: its type and the first line of its message (Ray's wrappers carry
    the replica's traceback after it)."""
    cause = getattr(exc, "cause", None) or exc
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {first}"[:300] if first else type(cause).__name__
