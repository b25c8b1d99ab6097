"""Spill-over: with the fast pool scaled to zero, a non-thinking request is served by the
thinking pool, and the response says so."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from deployments.config import AppConfig
from tests.serving.conftest import start_app, stop_app


@pytest.fixture(scope="module")
def server(qwen_vocab_checkpoint: Path):
    cfg = AppConfig.model_validate({
        "model": str(qwen_vocab_checkpoint), "served_model_name": "m",
        "thinking": {"dtype": "float32", "kv_cache_memory_gb": 0.05},
        "fast": {"dtype": "float32", "kv_cache_memory_gb": 0.05, "autoscaling": {"min_replicas": 0, "max_replicas": 1}},
    })
    yield start_app(cfg, ready_pools=("thinking",))
    stop_app()


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
    from tests.serving.conftest import GRPC_PORT

    client = Q3ServeClient(f"127.0.0.1:{GRPC_PORT['port']}")
    try:
        assert client.health() == 2  # NOT_SERVING: the fast pool has no replica
    finally:
        client.close()
