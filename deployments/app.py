"""Builds the Serve application from an AppConfig (Ray Serve LLM's config-plus-builder pattern):
one ModelPool deployment per enabled pool, each with its own autoscaling, behind the
ingress (HTTP and gRPC). `serve run deployments.app:app_builder key=value ...` uses `app_builder`."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.config import AppConfig, PoolConfig
from deployments.ingress import Ingress
from deployments.pool import ModelPool

APP_NAME = "q3serve"
# Serve's settings this application relies on. They are read when each Ray process starts, so
# they go into the environment before `ray.init` (and into the chart's pods).
# The controller's (the chart sets them on the head): a replica whose health checks fail 3 times
# in a row has a dead engine (nothing it runs can finish), so it is stopped at once rather than
# given its graceful-shutdown period: the pool is rebuilt sooner. A proxy gets 30 s (not Serve's
# 5 s) to say it is ready: on a busy host (a node still loading a model, CPUs saturated) a 5 s
# check kills a healthy starting proxy, and `serve.start` fails with ActorDiedError.
SERVE_CONTROLLER_ENV = {"RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}
# Every process's (the chart sets them on every pod): handles (proxy -> ingress -> pool) call
# replicas over Serve's gRPC transport rather than Ray actor calls, which costs less per request
# and per streamed chunk: under a 64-request burst on 2 CPUs, output tokens/s 796 against 672 and
# TTFT p99 860 against 929 ms (means of 4 runs each, alternating: results/saturation_ttft.json).
# Its messages are capped at 4 MiB by default, less than a long prompt's top logprobs (32K tokens
# x 20): the cap is gRPC's largest, as for Serve's own proxy, and the ingress's
# limits.max_request_bytes is what bounds a request.
SERVE_PROCESS_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1)}
SERVE_ENV = {**SERVE_CONTROLLER_ENV, **SERVE_PROCESS_ENV}


def apply_serve_env() -> None:
    """Sets SERVE_ENV where the environment does not already say otherwise."""
    import os

    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)


# The ingress outlives its pools' grace by this much when Serve stops it (a redeploy, its node
# draining): a pool replica past its grace is stopped, and the ingress still has time to turn that
# into the retriable error event on each stream it carries instead of a cut connection.
INGRESS_GRACE_MARGIN_S = 10.0


def ingress_grace_s(cfg: AppConfig) -> float:
    """The ingress's graceful-shutdown period: the longest pool grace plus the margin."""
    return max(p.graceful_shutdown_timeout_s for p in cfg.pools().values()) + INGRESS_GRACE_MARGIN_S


def _expert_parallel(pool: PoolConfig) -> bool:
    """Whether the replica's instance runs on Ray actors of its own (not in the replica's process)."""
    return not pool.parallel.in_process


def _instance_bundles(pool: PoolConfig) -> dict[str, Any]:
    """An expert-parallel replica reserves its instance with it: bundle 0 for the replica, then
    one bundle per actor of the instance (what cluster.parallel.instance places them in)."""
    if not _expert_parallel(pool):
        return {}
    bundles = [{"CPU": float(pool.replica_cpus)}] + pool.parallel.bundles()
    return {"placement_group_bundles": bundles, "placement_group_strategy": "PACK"}


def build_app(cfg: AppConfig, app_name: str = APP_NAME) -> Application:
    handles = {}
    for name, pool in cfg.pools().items():
        deployment = serve.deployment(
            ModelPool,
            name=f"{name}-pool",
            max_ongoing_requests=pool.ongoing_limit,
            max_queued_requests=pool.max_queued_requests,
            autoscaling_config=pool.autoscaling.model_dump(),
            ray_actor_options={"num_cpus": pool.replica_cpus, "num_gpus": 1 if pool.parallel.device == "cuda" and not _expert_parallel(pool) else 0},
            **_instance_bundles(pool),
            health_check_period_s=pool.health_check_period_s,
            health_check_timeout_s=pool.health_check_timeout_s,
            graceful_shutdown_timeout_s=pool.graceful_shutdown_timeout_s,
        )
        handles[name] = deployment.bind(name, cfg.model, pool)
    ingress = serve.deployment(Ingress, name="ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1000,
                               graceful_shutdown_timeout_s=ingress_grace_s(cfg))
    return ingress.bind(cfg, handles, app_name)


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run deployments.app:app_builder` and KubeRay's serveConfigV2 (`args` hold an
    AppConfig, or `config_path` naming its YAML)."""
    if "config_path" in args:
        cfg = AppConfig.from_yaml(args["config_path"])
    else:
        cfg = AppConfig.model_validate(args)
    return build_app(cfg)
