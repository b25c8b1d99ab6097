"""Spill-over: with the fast pool scaled to zero, a non-thinking request is served by the
thinking pool, and the response says so."""

from __future__ import annotations

import openai
import pytest

from tests.helpers.serving import APP, GRPC_PORT, ServeApp


@pytest.fixture(scope="module")
def server(serve_app: ServeApp) -> str:
    return serve_app(fast={"autoscaling": {"min_replicas": 0, "max_replicas": 1}}, ready_pools=("thinking",))


def test_no_think_spills_to_thinking_pool(server: str) -> None:
    import httpx

    health = httpx.get(f"{server}/health", timeout=10)
    assert health.status_code == 503 and health.json()["pools"] == {"thinking": True, "fast": False}
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "quick /no_think"}], max_tokens=4,
    )
    assert raw.headers["x-q3serve-pool"] == "thinking"
    assert raw.parse().choices[0].finish_reason in ("length", "stop")


def test_grpc_health_not_serving_until_every_pool_is_ready(server: str) -> None:
    from deployments.grpc_client import Q3ServeClient

    client = Q3ServeClient(f"127.0.0.1:{GRPC_PORT['port']}")
    try:
        assert client.health() == 2  # NOT_SERVING: the fast pool has no replica
    finally:
        client.close()


def test_replica_counts_say_what_serve_status_says(server: str) -> None:
    """The router's replica counts (read from the controller's plain details, in the background)
    equal serve.status()'s: one thinking replica, no fast one."""
    import asyncio

    from ray import serve

    from deployments.replica_counts import ReplicaCounts, _running

    want = {name: d.replica_states.get("RUNNING", 0) for name, d in serve.status().applications[APP].deployments.items()}
    assert _running(APP) == want and want["thinking-pool"] == 1 and want["fast-pool"] == 0

    async def counts() -> tuple:
        replicas = ReplicaCounts(APP)
        first = replicas.get("thinking-pool")  # nothing known yet: a refresh starts, nobody waits
        for _ in range(300):
            if replicas.get("thinking-pool") is not None:
                break
            await asyncio.sleep(0.1)
        return first, replicas.get("thinking-pool"), replicas.get("fast-pool")

    assert asyncio.run(counts()) == (None, 1, 0)
