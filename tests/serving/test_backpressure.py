"""Spill-over on a full queue: when the fast pool refuses a request (Serve's max_queued_requests
reached), the thinking pool serves it."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import pytest

from deployments.config import AppConfig
from tests.serving.conftest import start_app, stop_app


@pytest.fixture(scope="module")
def server(qwen_vocab_checkpoint: Path):
    cfg = AppConfig.model_validate({
        "model": str(qwen_vocab_checkpoint), "served_model_name": "m",
        "thinking": {"dtype": "float32", "kv_cache_memory_gb": 0.05},
        "fast": {"dtype": "float32", "kv_cache_memory_gb": 0.05, "max_ongoing_requests": 1, "max_queued_requests": 1},
    })
    yield start_app(cfg)
    stop_app()


def test_full_fast_queue_spills_to_thinking(server: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "ignore_eos": True,
            "enable_thinking": False}
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(httpx.post, f"{server}/v1/chat/completions", json=body, timeout=120) for _ in range(6)]
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    served_by = [r.headers["x-q3serve-pool"] for r in responses]
    assert "fast" in served_by and "thinking" in served_by, served_by
