"""Faults under load, injected by `q3serve bench` into a pool of two attention shards and two
expert groups while requests stream: a killed expert group, a stalled one (SIGSTOP: its peers'
collective would wait forever, the step watchdog ends it) and a killed pool replica. Each time:
no request hangs; a request fails only after it streamed tokens, and then with a retriable 503
in OpenAI's error shape (the ones that had not streamed are retried and served); the broken
instance is torn down as a whole and Serve brings the pool back."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from benchmarks.serving.clients import SamplingArgs
from benchmarks.serving.faults import FaultConfig
from benchmarks.serving.run import BenchConfig, bench
from benchmarks.serving.workload import WorkloadConfig
from deployments.config import AppConfig
from tests.serving.conftest import APP, GRPC_PORT, start_app, stop_app

EP = {"dtype": "float32", "kv_cache_memory_gb": 0.05, "attention_shards": 2, "expert_groups": 2,
      "step_timeout_s": 5, "health_check_period_s": 1}


@pytest.fixture(scope="module")
def server(qwen_vocab_checkpoint: Path):
    cfg = AppConfig.model_validate({
        "model": str(qwen_vocab_checkpoint), "served_model_name": "m",
        "thinking": EP, "fast": {"dtype": "float32", "kv_cache_memory_gb": 0.05},
    })
    yield start_app(cfg)
    stop_app()


def _run(server: str, kind: str, backend: str = "openai-chat") -> dict:
    workload = WorkloadConfig(num_prompts=24, input_len=16, output_len=64, thinking_share=0.75, seed=3)
    cfg = BenchConfig(url=server, grpc_target=f"127.0.0.1:{GRPC_PORT['port']}", backend=backend, model="m",
                      request_rate=6.0, duration_s=60, timeout_s=45, workload=workload,
                      sampling=SamplingArgs(ignore_eos=backend != "grpc-chat"),
                      fault=FaultConfig(kind, at_s=3.0, pool="thinking", recover_timeout_s=120))
    (run,) = bench(cfg, [6.0], progress=False)
    return run


def _check(run: dict, retriable: str) -> None:
    fault, records = run["fault"], run["records"]
    print(fault)
    assert fault["all"]["hung"] == 0 and fault["all"]["failed_other"] == 0, fault["other_errors"]
    assert fault["in_flight"]["requests"] > 0  # the fault hit a loaded pool
    for r in records:
        if r["error"] is not None:
            # Only a request that had streamed tokens may fail, and then with a retriable error.
            assert r["status"] == retriable and r["ttft_s"] is not None, r
            assert "retry" in r["error"], r
    # The thinking pool serves again: a new replica built its instance.
    assert fault["recovered_after_s"] is not None
    stats = serve.get_deployment_handle("thinking-pool", app_name=APP).stats.remote().result(timeout_s=30)
    assert set(stats["instance_actors"]) == {"attention-shard-0", "attention-shard-1", "expert-group-0", "expert-group-1"}
    assert fault["target"] not in stats["instance_actors"].values()
    assert stats["running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    # The old instance is gone as a whole: no actor of its tag is alive.
    tag = fault["target"].split("-")[1]
    alive = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in alive if n.startswith(f"q3serve-{tag}-")], alive


def test_killed_expert_group(server: str) -> None:
    _check(_run(server, "expert-group"), "503")


def test_stalled_expert_group_caught_by_the_step_watchdog(server: str) -> None:
    """gRPC this time: a stream cut by the fault ends with UNAVAILABLE."""
    _check(_run(server, "stall", backend="grpc-chat"), "UNAVAILABLE")


def test_killed_pool_replica(server: str) -> None:
    run = _run(server, "replica")
    fault = run["fault"]
    assert fault["target"].startswith(f"SERVE_REPLICA::{APP}#thinking-pool#")
    assert fault["all"]["hung"] == 0 and fault["all"]["failed_other"] == 0, fault["other_errors"]
    for r in run["records"]:
        if r["error"] is not None:
            assert r["status"] == "503" and r["ttft_s"] is not None, r
    assert fault["recovered_after_s"] is not None
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "chat_template_kwargs": {"enable_thinking": True}})
    assert r.status_code == 200 and r.headers["x-q3serve-pool"] == "thinking"
