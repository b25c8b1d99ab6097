"""One model instance spread over Ray actors: A attention shards and E expert groups (or, in the
colocated layout, A actors that are both) in one placement group (a bundle per actor) and one
torch.distributed group (gloo on CPU, nccl on CUDA). Steps run in lock-step: every shard gets its
plan and every group serves, each step.

Failure: a step waits on all actors with `ray.wait`, so the first actor that dies or raises is
seen at once and named; the instance then kills the rest (ending any collective they were
blocked in) and refuses further steps. Collectives themselves time out after `step_timeout_s`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from pathlib import Path

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.parallel.actors import AttentionShard
from cluster.config import ModelConfig, ParallelConfig
from cluster.parallel.actors import ExpertGroup
from cluster.parallel.placement import ExpertPlacement, contiguous
from cluster.engine.plan import Sampled, StepPlan

log = logging.getLogger(__name__)


class InstanceError(RuntimeError):
    """An actor of the instance died, failed or timed out; the instance is unusable."""


def resolve_placement(cfg: ModelConfig, parallel: ParallelConfig) -> ExpertPlacement:
    n_layers = len(cfg.moe_layers)
    if cfg.num_experts == 0:
        raise ValueError("expert_groups: a dense model has no experts to place; use expert_groups=1")
    if parallel.expert_groups > cfg.num_experts:
        raise ValueError(f"expert_groups: {parallel.expert_groups} groups for {cfg.num_experts} experts")
    p = parallel.placement
    if p == "contiguous":
        return contiguous(cfg.num_experts, parallel.expert_groups, n_layers)
    if isinstance(p, (str, Path)):  # a map saved by `q3serve experts place`
        p = ExpertPlacement.load(p)
    if not isinstance(p, ExpertPlacement):
        raise ValueError(f"placement: {p!r} is neither 'contiguous', a map file nor an ExpertPlacement")
    if (p.num_experts, p.num_groups, p.num_layers) != (cfg.num_experts, parallel.expert_groups, n_layers):
        raise ValueError(
            f"placement: built for {p.num_experts} experts x {p.num_groups} groups x {p.num_layers} MoE layers, "
            f"the instance has {cfg.num_experts} x {parallel.expert_groups} x {n_layers}"
        )
    return p


class RayExecutor:
    def __init__(
        self, path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str, num_blocks: int,
        block_size: int, max_model_len: int, parallel: ParallelConfig,
    ) -> None:
        self.parallel = parallel
        self.cfg = cfg
        self.num_shards = parallel.attention_shards
        self.placement = resolve_placement(cfg, parallel)
        self.failed: str | None = None
        self.dag = None
        if not ray.is_initialized():
            ray.init(num_cpus=max(os.cpu_count() or 1, 2 * (parallel.attention_shards + parallel.expert_groups)))
        a, e = parallel.attention_shards, parallel.expert_groups
        bundles = parallel.bundles()
        world = parallel.num_actors
        colocated = parallel.colocated
        # Inside a Serve replica that reserved bundles for its instance (bundle 0 is the replica
        # itself), the actors go into those; otherwise the instance reserves its own group.
        current = ray.util.get_current_placement_group()
        self.owns_pg = current is None
        if current is not None:
            if len(current.bundle_specs) < 1 + world:
                raise InstanceError(
                    f"placement_group_bundles: the replica's placement group has {len(current.bundle_specs)} bundles, "
                    f"the instance needs 1 + {world}"
                )
            self.pg, self.offset = current, 1
        else:
            selectors = [parallel.labels(kind) for kind in parallel.kinds()]
            self.pg, self.offset = placement_group(
                bundles, strategy=parallel.placement_strategy,
                bundle_label_selector=selectors if any(selectors) else None,
            ), 0
        try:
            ray.get(self.pg.ready(), timeout=parallel.step_timeout_s)
        except ray.exceptions.GetTimeoutError:
            if self.owns_pg:
                remove_placement_group(self.pg)
            raise InstanceError(f"placement group {bundles} could not be placed within {parallel.step_timeout_s}s") from None
        tag = uuid.uuid4().hex[:6]
        self.names: dict[ray.actor.ActorHandle, str] = {}
        self.actor_names: dict[str, str] = {}  # "expert-group-1" -> its Ray actor name (ops, fault injection)
        self.shards = [
            self._spawn(AttentionShard, i, f"attention-shard-{i}" + ("+expert-group" if colocated else ""), bundles[i],
                        tag, path, cfg, dtype, device, num_blocks, block_size, max_model_len, i, a, e, self.placement,
                        parallel.torch_threads, colocated)
            for i in range(a)
        ]
        self.groups = [] if colocated else [
            self._spawn(ExpertGroup, a + j, f"expert-group-{j}", bundles[a + j], tag,
                        path, cfg, dtype, device, a + j, a, e, self.placement, parallel.torch_threads)
            for j in range(e)
        ]
        self.actors = self.shards + self.groups
        backend = "nccl" if device == "cuda" else "gloo"
        try:
            addr, port = ray.get(self.shards[0].rendezvous_address.remote(), timeout=600)
            self._wait(
                {a_.join.remote(backend, addr, port, world, parallel.step_timeout_s): a_ for a_ in self.actors}, 600
            )
        except BaseException:
            self.shutdown()
            raise

    def _spawn(self, cls: type, index: int, name: str, bundle: dict[str, float], tag: str, *args: object):  # noqa: ANN202
        """Starts one actor in its bundle and remembers its name for error messages."""
        actor = ray.remote(cls).options(
            name=f"q3serve-{tag}-{name}",
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.offset + index),
            max_concurrency=2,  # ping and stats answer while a step runs
        ).remote(*args)
        self.names[actor] = name
        self.actor_names[name] = f"q3serve-{tag}-{name}"
        return actor

    def _wait(self, futures: dict, timeout_s: float) -> list:
        """Results in the order given; raises InstanceError naming the first actor that failed."""
        pending = list(futures)
        results = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                waiting = sorted({self.names[futures[f]] for f in pending})
                self._fail(f"timed out after {timeout_s}s waiting for {', '.join(waiting)}")
            for f in ready:
                try:
                    results[f] = ray.get(f)
                except ray.exceptions.RayActorError as exc:
                    self._fail(f"actor {self.names[futures[f]]} died: {type(exc).__name__}")
                except ray.exceptions.RayTaskError as exc:
                    self._fail(f"actor {self.names[futures[f]]} failed: {exc.cause!r}")
        return [results[f] for f in futures]

    def _fail(self, why: str) -> None:
        self.failed = why
        log.error("instance failed: %s", why)
        self.shutdown()
        raise InstanceError(f"model instance failed: {why}")

    def execute(self, plans: list[StepPlan]) -> list[list[Sampled]]:
        if self.failed:
            raise InstanceError(f"model instance failed: {self.failed}")
        if self.dag is None:
            self.dag = self._compile()
        try:
            results = ray.get(self.dag.execute(*plans), timeout=self.parallel.step_timeout_s)
        except Exception as exc:  # noqa: BLE001 - which actor? ask them all, then fail
            self._fail(self._diagnose(exc))
        return results[: self.num_shards]

    def _compile(self):  # noqa: ANN202
        """A Ray compiled graph for the step: plans go to the shards and a tick to the groups
        over shared-memory channels, which costs a fraction of a task submission per actor."""
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as plans:
            outputs = [s.execute.bind(plans[i]) for i, s in enumerate(self.shards)]
            outputs += [g.serve_step.bind(plans[0]) for g in self.groups]
            dag = MultiOutputNode(outputs)
        return dag.experimental_compile()

    def _diagnose(self, exc: BaseException) -> str:
        """Names the actor behind a failed step: the first that does not answer a ping."""
        pings = {a.ping.remote(): a for a in self.actors}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=5.0)
        for ref, actor in pings.items():
            if ref not in ready:
                return f"actor {self.names[actor]} did not answer"
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                return f"actor {self.names[actor]} died"
        if isinstance(exc, ray.exceptions.GetTimeoutError):
            return f"step timed out after {self.parallel.step_timeout_s}s"
        cause = getattr(exc, "cause", None) or exc
        return f"step failed: {cause!r}"

    def call_all(self, method: str, *args, actors: list | None = None) -> list:  # noqa: ANN002
        """Calls a method on every actor (or those given), bounded by the step timeout."""
        targets = actors if actors is not None else self.actors
        return self._wait({getattr(a, method).remote(*args): a for a in targets}, self.parallel.step_timeout_s)

    def memory_reports(self) -> list:
        return self.call_all("memory_report", actors=self.shards)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.call_all("allocate_kv_cache", num_blocks, actors=self.shards)

    def expert_usage(self) -> torch.Tensor:
        return torch.stack(self.call_all("expert_usage", actors=self.shards)).sum(0)

    def replan(self, placement: ExpertPlacement | str | Path, timeout_s: float = 600.0) -> dict:
        """Moves the instance to a new expert placement; call between steps only. Each expert
        group reads the experts it holds now from the checkpoint (layers that did not change
        stay), every rank swaps its routing tables. A failure fails the instance, as a failed
        step does (Serve then rebuilds the replica)."""
        new = resolve_placement(self.cfg, dataclasses.replace(self.parallel, placement=placement))
        holders = self.expert_holders
        reloaded = dict(zip(self.actors, self._wait({a.replan.remote(new): a for a in self.actors}, timeout_s)))
        self.placement = new
        return {"groups": len(holders), "layers_reloaded": [reloaded[a] for a in holders]}

    @property
    def expert_holders(self) -> list:
        """The actors holding expert groups, in group order (the shards in the colocated layout)."""
        return self.shards if self.parallel.colocated else self.groups

    def expert_group_rows(self, reset: bool = False) -> list[list[list[int]]]:
        """[group][MoE layer][step]: rows each expert group computed per layer in recent steps."""
        return [s["expert_rows"] for s in self.call_all("exchange_stats", reset, actors=self.expert_holders)]

    def check_health(self) -> None:
        if self.failed:
            raise InstanceError(f"model instance failed: {self.failed}")
        self._wait({a.ping.remote(): a for a in self.actors}, 10.0)

    def shutdown(self) -> None:
        """Closes the process group on each actor (when healthy), then kills every actor (a
        collective one is blocked in dies with it) and frees the bundles."""
        dag, self.dag = getattr(self, "dag", None), None
        if dag is not None and not self.failed:
            try:
                dag.teardown()
            except Exception:  # noqa: BLE001 - the actors are killed below anyway
                pass
        actors = getattr(self, "actors", [])
        if actors and not self.failed:
            try:
                ray.get([a.close.remote() for a in actors], timeout=10)
            except Exception:  # noqa: BLE001 - kill below regardless
                pass
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if getattr(self, "owns_pg", False):
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
