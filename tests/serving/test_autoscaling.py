"""A pool with min 1 / max 2 replicas scales to 2 under sustained load and back to 1 after."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from ray import serve

from tests.helpers.serving import ServeApp


@pytest.fixture(scope="module")
def server(serve_app: ServeApp) -> str:
    return serve_app(thinking={"autoscaling": {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
        "downscale_delay_s": 4, "look_back_period_s": 10.5}}, fast={"enabled": False})


def _replicas() -> int:
    app = serve.status().applications["q3serve"]
    return app.deployments["thinking-pool"].replica_states.get("RUNNING", 0)


def _wait_for(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.5)
    return False


def test_scales_up_under_load_and_back(server: str) -> None:
    assert _replicas() == 1
    stop = threading.Event()

    def load() -> None:
        body = {"model": "m", "prompt": "load", "max_tokens": 200, "ignore_eos": True}
        while not stop.is_set():
            try:
                httpx.post(f"{server}/v1/completions", json=body, timeout=120)
            except httpx.HTTPError:
                pass

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert _wait_for(lambda: _replicas() == 2, 120), "did not scale up to 2 replicas"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
    assert _wait_for(lambda: _replicas() == 1, 120), "did not scale back to 1 replica"
