"""Faults under load, injected by `q3serve bench` into a pool of two attention shards and two
expert groups while requests stream: a killed expert group, a stalled one (SIGSTOP: its peers'
collective would wait forever, the step watchdog ends it) and a killed pool replica. Each time:
no request hangs; a request fails only after it streamed tokens, and then with a retriable 503
in OpenAI's error shape (the ones that had not streamed are retried and served); the broken
instance is torn down as a whole and Serve brings the pool back. Last, a redeploy of a pool (to
fewer replicas, with a new config, so Serve replaces its replicas): the leaving replicas' streams
finish within their grace period or end with the retriable 503."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from deployments.tools.bench.clients import SamplingArgs
from deployments.tools.bench.faults import FaultConfig
from deployments.tools.bench.run import BenchConfig, bench
from deployments.tools.bench.workload import WorkloadConfig
from deployments.app import build_app
from tests.helpers.serving import APP, GRPC_PORT, ServeApp, app_config, stream_completion

EP = {"attention_shards": 2, "expert_groups": 2, "step_timeout_s": 5, "health_check_period_s": 1}


def _overrides(fast_replicas: int = 2) -> dict:
    """The thinking pool EP; the fast pool with `fast_replicas` replicas and a 1 s grace period."""
    replicas = {"min_replicas": fast_replicas, "max_replicas": fast_replicas}
    return {"thinking": EP, "fast": {"graceful_shutdown_timeout_s": 1, "autoscaling": replicas}}


@pytest.fixture(scope="module")
def server(serve_app: ServeApp) -> str:
    return serve_app(**_overrides())


def _run(server: str, kind: str, backend: str = "openai-chat") -> dict:
    workload = WorkloadConfig(num_prompts=24, input_len=16, output_len=64, thinking_share=0.75, seed=3)
    cfg = BenchConfig(url=server, grpc_target=f"127.0.0.1:{GRPC_PORT['port']}", backend=backend, model="m",
                      request_rate=6.0, duration_s=60, timeout_s=45, workload=workload,
                      sampling=SamplingArgs(ignore_eos=backend != "grpc-chat"),
                      fault=FaultConfig(kind, at_s=2.0, pool="thinking", recover_timeout_s=120))
    (run,) = bench(cfg, [6.0], progress=False)
    return run


def _check(run: dict, retriable: str) -> None:
    fault, records = run["fault"], run["records"]
    print(fault)
    assert fault["all"]["hung"] == 0 and fault["all"]["failed_other"] == 0, fault["other_errors"]
    assert fault["in_flight"]["requests"] > 0  # the fault hit a loaded pool
    # Requests that reached the broken instance before their first token were retried and said so
    # (the x-q3serve-retries header over HTTP, trailing metadata over gRPC). The workload is seeded:
    # five thinking requests arrive 0.5-1.3 s after the fault, so some always are.
    assert fault["all"]["retried"] > 0, fault
    for r in records:
        if r["error"] is not None:
            _failed_mid_stream(r, retriable)
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


def _failed_mid_stream(r: dict, retriable: str) -> None:
    """Only a request whose response had started may fail (one that had not is retried), and
    then with a retriable error naming the cause. Over HTTP the response had started when it
    carries the pool header (the 503 came as an error event, not as the response's status)."""
    assert r["status"] == retriable and "retry" in r["error"], r
    if retriable == "503":
        assert r["pool"] is not None, r


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
            _failed_mid_stream(r, "503")
    assert fault["recovered_after_s"] is not None
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "chat_template_kwargs": {"enable_thinking": True}})
    assert r.status_code == 200 and r.headers["x-q3serve-pool"] == "thinking"


def test_redeploy_drains_the_leaving_replicas(server: str, qwen_vocab_checkpoint: Path) -> None:
    """Four long streams over the fast pool's two replicas, then the pool is redeployed with one
    (its config is an init argument, so Serve replaces the replicas): Serve stops routing to the
    leaving replicas and gives their streams 1 s; each stream either completes or ends with the
    retriable 503 event (none is cut or hangs), and new requests are served throughout."""
    outs = [{} for _ in range(4)]
    threads = []
    for out in outs:
        started = threading.Event()
        body = {"model": "m", "prompt": "drain", "max_tokens": 1000, "ignore_eos": True}
        threads.append(threading.Thread(target=stream_completion, args=(server, body, out, started), daemon=True))
        threads[-1].start()
        assert started.wait(60)
    redeployed = app_config(qwen_vocab_checkpoint, **_overrides(fast_replicas=1))
    serve.run(build_app(redeployed), name=APP, route_prefix="/", blocking=False)
    r = httpx.post(f"{server}/v1/completions", timeout=60, json={"model": "m", "prompt": "new", "max_tokens": 4})
    assert r.status_code == 200, r.text
    for t in threads:
        t.join(90)
    print(outs)
    assert all(o.get("ended") and o["pool"] == "fast" for o in outs), outs
    for o in outs:
        assert o.get("finish_reason") == "length" or (o["error"]["code"] == 503 and "retry" in o["error"]["message"]), o
    assert any("error" in o for o in outs), outs  # 1000 tokens take longer than the 1 s grace here
