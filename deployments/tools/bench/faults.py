"""Fault injection for `q3serve bench`, on the machine the server runs on (it joins the local Ray
cluster): while the workload streams, one fault at a set time in one pool. `expert-group` and
`attention-shard` kill one actor of a replica's model instance; `replica` kills a whole pool
replica; `ingress` kills the ingress replica; `stall` stops an expert-group actor's process
(SIGSTOP: alive to Ray, silent to its peers, whose collective would wait forever) so the step
watchdog must catch it. Then the pool is probed until it serves again: the time to recover.

What the run's requests saw is classified by `outcomes`: completed, failed with a retriable error
(HTTP 503 / an error event with code 503 / gRPC UNAVAILABLE), failed otherwise, hung (ran into
the client's timeout: must be none), and retried (the server restarted them elsewhere before
their first token)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from deployments.tools.bench.clients import Record

FAULTS = ("expert-group", "attention-shard", "replica", "ingress", "stall")
APP = "q3serve"
RETRIABLE = {"503", "UNAVAILABLE"}


@dataclass
class FaultConfig:
    kind: str
    at_s: float = 5.0                # after the run's start
    pool: str = "thinking"
    recover_timeout_s: float = 180.0
    probe_every_s: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise ValueError(f"fault: '{self.kind}' is not one of {', '.join(FAULTS)}")
        if self.pool not in ("thinking", "fast"):
            raise ValueError(f"fault-pool: '{self.pool}' is not thinking or fast")


@dataclass
class Injected:
    """What was done, when (seconds from the run's start), and how long until the pool served again."""

    kind: str
    pool: str
    target: str
    at_s: float
    recovered_after_s: float | None = None
    pid: int | None = None  # a stopped process, resumed after the run in case it still exists
    # the pool deployment's replica states as they changed: [seconds after the fault, {state: count},
    # Serve's message when it has one]
    replica_states: list = field(default_factory=list)


def _connect() -> None:
    import ray

    if not ray.is_initialized():  # `q3serve up`'s cluster, on this machine
        ray.init(address="auto", namespace="serve", log_to_driver=False)


def _named_actors() -> dict[str, str]:
    """Every live named actor of the cluster: name -> namespace."""
    import ray

    return {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)}


def _actor(name: str) -> Any:
    import ray

    namespace = _named_actors().get(name)
    if namespace is None:
        raise ValueError(f"fault: no live actor named {name}")
    return ray.get_actor(name, namespace=namespace)


def _replica_names(deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(n for n in _named_actors() if n.startswith(prefix))


def _instance_actor(pool: str, role: str) -> str:
    """The Ray name of one actor (`expert-group-1`, `attention-shard-0`) of a replica's instance."""
    from ray import serve

    stats = serve.get_deployment_handle(f"{pool}-pool", app_name=APP).stats.remote().result(timeout_s=30)
    actors = stats["instance_actors"]
    matches = sorted(name for r, name in actors.items() if r.startswith(role))
    if not matches:
        raise ValueError(f"fault: the {pool} pool's instance has no {role} actor (it has {sorted(actors) or 'none'}): "
                         "run it expert-parallel (attention_shards x expert_groups > 1)")
    return matches[-1]


def inject(cfg: FaultConfig) -> Injected:
    """Does the fault now (blocking; run it off the event loop)."""
    import ray

    _connect()
    if cfg.kind in ("replica", "ingress"):
        deployment = "ingress" if cfg.kind == "ingress" else f"{cfg.pool}-pool"
        names = _replica_names(deployment)
        if not names:
            raise ValueError(f"fault: no running replica of {deployment}")
        ray.kill(_actor(names[0]), no_restart=True)
        return Injected(cfg.kind, cfg.pool, names[0], 0.0)
    role = "attention-shard" if cfg.kind == "attention-shard" else "expert-group"
    name = _instance_actor(cfg.pool, role)
    actor = _actor(name)
    if cfg.kind == "stall":
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
        os.kill(pid, signal.SIGSTOP)
        return Injected(cfg.kind, cfg.pool, name, 0.0, pid=pid)
    ray.kill(actor, no_restart=True)
    return Injected(cfg.kind, cfg.pool, name, 0.0)


def release(injected: Injected | None) -> None:
    """Resumes a stopped process that is still there (the instance normally killed it)."""
    if injected is not None and injected.pid is not None:
        try:
            os.kill(injected.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _replica_states(deployment: str) -> tuple[dict[str, int], str]:
    """The deployment's replica counts by state, and Serve's message about it (it names why a
    replica failed its health check or its start)."""
    from ray import serve

    app = serve.status().applications.get(APP)
    dep = app.deployments.get(deployment) if app is not None else None
    if dep is None:
        return {}, ""
    return {str(k): v for k, v in dep.replica_states.items()}, dep.message or ""


async def watch_states(deployment: str, since: float, timeline: list, every_s: float = 0.5) -> None:
    """Appends the deployment's replica states (and Serve's message, when it says something) each
    time they change, until cancelled: where the time to recover goes (noticing the failure,
    stopping the old replica, building the new one) and why a replica was stopped."""
    while True:
        states, message = await asyncio.to_thread(_replica_states, deployment)
        entry = [states, message[:300]] if message else [states]
        if not timeline or timeline[-1][1:] != entry:
            timeline.append([round(time.perf_counter() - since, 2), *entry])
        await asyncio.sleep(every_s)


async def probe_until_served(http: httpx.AsyncClient, model: str, cfg: FaultConfig, since: float) -> float | None:
    """Seconds from `since` until a request of the pool's mode is served by that pool again
    (spill-over may serve it from the other pool meanwhile), or None at the timeout."""
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 2,
            "chat_template_kwargs": {"enable_thinking": cfg.pool == "thinking"}}
    deadline = since + cfg.recover_timeout_s
    while time.perf_counter() < deadline:
        try:
            r = await http.post("/v1/chat/completions", json=body, timeout=30)
            if r.status_code == 200 and r.headers.get("x-q3serve-pool") == cfg.pool:
                return time.perf_counter() - since
        except (httpx.HTTPError, OSError):
            pass
        await asyncio.sleep(cfg.probe_every_s)
    return None


async def run_fault(cfg: FaultConfig, http: httpx.AsyncClient, model: str, t0: float) -> Injected:
    """At `cfg.at_s` after `t0`: the fault, then probes until the pool serves again."""
    await asyncio.sleep(max(0.0, t0 + cfg.at_s - time.perf_counter()))
    at = time.perf_counter()
    injected = await asyncio.to_thread(inject, cfg)
    injected.at_s = at - t0
    watch = asyncio.create_task(watch_states(f"{cfg.pool}-pool", at, injected.replica_states))
    try:
        injected.recovered_after_s = await probe_until_served(http, model, cfg, at)
    finally:
        watch.cancel()
    return injected


def outcomes(records: list[Record], injected: Injected) -> dict[str, Any]:
    """The requests in flight at the fault (sent before it, ended after it) and the whole run:
    completed, failed with a retriable error, failed otherwise, hung, retried."""
    def count(rs: list[Record]) -> dict[str, int]:
        return {
            "requests": len(rs),
            "completed": sum(r.ok for r in rs),
            "failed_retriable": sum(not r.ok and r.status in RETRIABLE for r in rs),
            "failed_other": sum(not r.ok and r.status not in RETRIABLE and r.status != "timeout" for r in rs),
            "hung": sum(r.status == "timeout" for r in rs),
            "retried": sum(r.retries > 0 for r in rs),
        }
    in_flight = [r for r in records if r.start_s <= injected.at_s and (r.end_s or 0) >= injected.at_s]
    other_errors = sorted({r.error for r in records if not r.ok and r.status not in RETRIABLE and r.error})[:5]
    return {**asdict(injected), "in_flight": count(in_flight), "all": count(records), "other_errors": other_errors}
