"""The serving tests' application: one default config (small pools in float32 on the
Qwen-vocabulary checkpoint), deployed from overrides of it on one shared local Ray cluster with
real Serve HTTP and gRPC proxies; and the clients' helpers (a streamed completion in a thread,
a pool's stats once idle).

The cluster and Serve start with the first `start_app` (on free ports, kept in the *_PORT dicts)
and are shut down after the package's last test (tests/serving/conftest.py); each module deploys
its own application under the one name APP and deletes it when done."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve

from deployments.app import apply_serve_env, build_app
from deployments.config import AppConfig

APP = "q3serve"

# Every serving module's application is this one with its overrides deep-merged in (a pool's
# fields are merged into POOL's, not replacing them): two small float32 pools, served as "m".
POOL: dict[str, Any] = {"dtype": "float32", "kv_cache_memory_gb": 0.05}
DEFAULT_APP: dict[str, Any] = {"served_model_name": "m", "thinking": POOL, "fast": POOL}

# What the serving modules' `serve_app` fixture is: (config=None, *, ready_pools=None, **overrides) -> base URL.
ServeApp = Callable[..., str]

HTTP_PORT: dict[str, int] = {}
METRICS_PORT: dict[str, int] = {}
GRPC_PORT: dict[str, int] = {}


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` in: dicts merged key by key, anything else replaced; neither is changed."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def app_config(model: Path | str, **overrides: Any) -> AppConfig:
    """DEFAULT_APP on `model` with `overrides` deep-merged in; a pool overridden with
    `"enabled": False` takes none of POOL's fields (it is not deployed)."""
    merged = deep_merge({**DEFAULT_APP, "model": str(model)}, overrides)
    for pool in ("thinking", "fast"):
        if merged[pool].get("enabled") is False:
            merged[pool] = overrides[pool]
    return AppConfig.model_validate(merged)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, pools: tuple[str, ...] | None = None, timeout_s: float = 120) -> None:
    """Until /health says every pool (or the pools named) has a ready replica."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base}/health", timeout=5)
            ready = r.json().get("pools", {})
            if (pools is None and r.status_code == 200) or (pools and all(ready.get(p) for p in pools)):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base}/health not ready within {timeout_s}s")


def _ensure_cluster() -> None:
    """Starts the shared Ray cluster and Serve (HTTP, gRPC, metrics on free ports) once."""
    from deployments.api.grpc_api import SERVICER_FUNCTIONS

    if ray.is_initialized():
        return
    HTTP_PORT["port"], METRICS_PORT["port"], GRPC_PORT["port"] = free_port(), free_port(), free_port()
    apply_serve_env()
    ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT["port"])
    serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT["port"]},
                grpc_options={"port": GRPC_PORT["port"], "grpc_servicer_functions": SERVICER_FUNCTIONS})


def start_app(cfg: AppConfig, ready_pools: tuple[str, ...] | None = None) -> str:
    """Deploys the application on the shared cluster, waits until it is healthy (or until the
    pools named are) and returns its base URL."""
    _ensure_cluster()
    serve.run(build_app(cfg), name=APP, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{HTTP_PORT['port']}"
    wait_healthy(base, ready_pools)
    return base


def stop_app() -> None:
    """Deletes the module's application (blocking until its replicas are gone); the cluster stays."""
    if ray.is_initialized():
        serve.delete(APP)


def shutdown_cluster() -> None:
    """Shuts the shared cluster (Serve, then Ray) down, if it was started."""
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def scrape_metrics(names: list[str]) -> dict[str, dict[str, float]]:
    """Each metric's series (pools, routes, replicas: the label set) and values in the Prometheus export."""
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT['port']}/metrics", timeout=10).text
    series: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(name + "{") or line.startswith(name + " "):
                key, value = line.rsplit(" ", 1)
                series.setdefault(name, {})[key] = float(value)
    return series


def requests_counted(route: str, status: str, seen: dict[str, dict[str, float]] | None = None) -> float:
    """q3serve_requests_total under `route` and `status`, summed over pools and replicas: in
    `seen` (what scrape_metrics returned), or scraped now."""
    seen = scrape_metrics(["ray_q3serve_requests_total"]) if seen is None else seen
    series = seen.get("ray_q3serve_requests_total", {})
    return sum(v for k, v in series.items() if f'route="{route}"' in k and f'status="{status}"' in k)


def pool_idle_stats(pool: str = "fast-pool", timeout_s: float = 30) -> dict:
    """The pool's stats once nothing runs and every KV block is free (or at the timeout)."""
    handle = serve.get_deployment_handle(pool, app_name=APP)
    deadline = time.monotonic() + timeout_s
    while True:
        stats = handle.stats.remote().result(timeout_s=30)
        idle = stats["running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def stream_completion(base: str, body: dict, out: dict, started: threading.Event, timeout_s: float = 120,
                      headers: dict | None = None) -> None:
    """A streamed /v1/completions (for a thread): records the status, the pool header, the text,
    the last finish_reason and the error event the stream ended with, if any, and `ended`;
    `started` is set at the first event (and at the end, so a waiter never waits on a stream that
    failed to start)."""
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=timeout_s,
                          headers=headers) as r:
            out["status"] = r.status_code
            out["pool"] = r.headers.get("x-q3serve-pool")
            out.setdefault("text", "")
            if r.status_code != 200:  # refused before streaming: OpenAI's error shape, whole
                out["error"] = json.loads(r.read())["error"]
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                started.set()
                if "error" in event:
                    out["error"] = event["error"]
                for choice in event.get("choices", []):
                    out["text"] += choice.get("text") or ""
                    out["finish_reason"] = choice.get("finish_reason") or out.get("finish_reason")
        out["ended"] = True
    finally:
        started.set()
