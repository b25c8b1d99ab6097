"""A running q3serve application on a local Ray cluster with real Serve HTTP and gRPC proxies.

One Ray cluster and one Serve instance are shared by every serving module (started by the first
`start_app`, shut down after the package's last test); each module deploys its own application
with `serve.run` and deletes it when done, so a module sees only its own replicas."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from deployments.app import apply_serve_env, build_app
from deployments.config import AppConfig
from tests.conftest import make_checkpoint


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


HTTP_PORT: dict[str, int] = {}
METRICS_PORT: dict[str, int] = {}
GRPC_PORT: dict[str, int] = {}


@pytest.fixture(scope="session")
def thinker_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen-vocabulary model whose greedy choice is always `<think>`: every embedding has
    a large constant in dimension 0, the final norm keeps only that dimension, and in lm_head only
    `<think>` has a positive weight on it. So with thinking on it opens <think> and never closes
    it by itself: what closes it is the thinking budget."""
    import torch
    from safetensors.torch import load_file, save_file

    from cluster.engine.tokenizer import THINK_START

    path = make_checkpoint(
        tmp_path_factory.mktemp("thinker"), vocab_size=151936, hidden_size=32, head_dim=8, num_hidden_layers=2,
        std=0.02, max_position_embeddings=1024,
    )
    t = load_file(path / "model.safetensors")
    t["model.embed_tokens.weight"][:, 0] = 50.0
    t["model.norm.weight"] = torch.zeros_like(t["model.norm.weight"])
    t["model.norm.weight"][0] = 1.0
    t["lm_head.weight"][:, 0] = -1.0
    t["lm_head.weight"][THINK_START, 0] = 1.0
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    return path


APP = "q3serve"


def _ensure_cluster() -> None:
    """Starts the shared Ray cluster and Serve (HTTP, gRPC, metrics on free ports) once."""
    from deployments.grpc_api import SERVICER_FUNCTIONS

    if ray.is_initialized():
        return
    HTTP_PORT["port"], METRICS_PORT["port"], GRPC_PORT["port"] = free_port(), free_port(), free_port()
    apply_serve_env()
    ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT["port"])
    serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT["port"]},
                grpc_options={"port": GRPC_PORT["port"], "grpc_servicer_functions": SERVICER_FUNCTIONS})


def start_app(cfg: AppConfig, ready_pools: tuple[str, ...] | None = None) -> str:
    """Deploys the application on the shared cluster and waits until it is healthy."""
    _ensure_cluster()
    serve.run(build_app(cfg), name=APP, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{HTTP_PORT['port']}"
    wait_healthy(base, ready_pools)
    return base


def stop_app() -> None:
    """Deletes the module's application (blocking until its replicas are gone); the cluster stays."""
    if ray.is_initialized():
        serve.delete(APP)


@pytest.fixture(scope="package", autouse=True)
def shared_cluster() -> Iterator[None]:
    """Shuts the shared cluster down after the last serving test."""
    yield
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


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
