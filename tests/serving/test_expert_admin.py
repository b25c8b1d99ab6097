"""The /admin expert routes of the running app (behind the API keys): a pool's live usage (its two
replicas' counters added) in the file format `q3serve experts prune | place` read, and a live
re-plan of an expert-parallel pool (two replicas, each with 2 expert groups) from those counters
while greedy requests stream: none fails, each gives the same tokens before, during and after,
and both replicas have moved to the one new map."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from deployments.tools.bench.clients import SamplingArgs
from deployments.tools.bench.replan import ReplanConfig
from deployments.tools.bench.run import BenchConfig, bench
from deployments.tools.bench.workload import WorkloadConfig
from cluster.model.expert_usage import ExpertUsage
from cluster.parallel.placement import ExpertPlacement
from tests.helpers.serving import ServeApp, stream_completion

KEY = "admin-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
EP = {"expert_groups": 2, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}


@pytest.fixture(scope="module")
def server(serve_app: ServeApp) -> str:
    return serve_app(api_keys=[KEY], thinking=EP)


def _greedy(i: int) -> dict:
    return {"model": "m", "prompt": f"count {i} {i + 1} {i + 2}", "max_tokens": 48, "temperature": 0,
            "ignore_eos": True, "stream": True, "thinking_budget": 64}


def test_usage_and_live_replan_under_load(server: str, qwen_vocab_checkpoint: Path) -> None:
    assert httpx.get(f"{server}/admin/experts/thinking", timeout=30).status_code == 401
    missing = httpx.get(f"{server}/admin/experts/nope", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "pool"

    def run_all(n: int, mid: callable | None = None) -> list[dict]:
        outs = [{} for _ in range(n)]
        started = [threading.Event() for _ in range(n)]
        threads = [threading.Thread(target=stream_completion, args=(server, _greedy(i), outs[i], started[i]),
                                    kwargs={"headers": AUTH}) for i in range(n)]
        for t in threads:
            t.start()
        if mid is not None:
            for s in started:
                assert s.wait(120)
            mid()
        for t in threads:
            t.join(300)
        return outs

    before = run_all(6)
    assert all(o.get("status") == 200 and o.get("error") is None for o in before), before
    usage = httpx.get(f"{server}/admin/experts/thinking", headers=AUTH, timeout=60)
    assert usage.status_code == 200
    parsed = ExpertUsage(**usage.json())
    parsed.check_model(qwen_vocab_checkpoint)
    assert "pool thinking, 2 replica(s)" in parsed.source and sum(parsed.tokens[0]) > 0

    replanned: dict = {}

    def replan() -> None:
        r = httpx.post(f"{server}/admin/experts/thinking/replan", json={"redundant": 2}, headers=AUTH, timeout=600)
        replanned.update(status=r.status_code, body=r.json())

    during = run_all(6, replan)
    assert replanned["status"] == 200, replanned
    body = replanned["body"]
    assert body["groups"] == 2 and len(body["replicas"]) == 2
    assert len({r["replica"] for r in body["replicas"]}) == 2
    assert all(r["replica"] in parsed.source for r in body["replicas"])  # the usage named the same replicas
    assert all(sum(r["layers_reloaded"]) > 0 and r["same_map"] for r in body["replicas"])
    assert body["after"]["max_group_tokens_sum"] <= body["before"]["max_group_tokens_sum"]
    placement = ExpertPlacement.from_dict(body["placement"])
    assert any(len(r) > 1 for layer in range(placement.num_layers) for r in placement.replicas(layer))
    after = run_all(6)
    for outs in (during, after):
        assert all(o.get("status") == 200 and o.get("error") is None for o in outs), outs
    assert [o["text"] for o in during] == [o["text"] for o in before] == [o["text"] for o in after]

    bad = httpx.post(f"{server}/admin/experts/fast/replan", json={}, headers=AUTH, timeout=60)
    assert bad.status_code == 400 and "one expert group" in bad.json()["error"]["message"]
    bad = httpx.post(f"{server}/admin/experts/thinking/replan", json={"redundant": 3}, headers=AUTH, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "redundant"
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200


def test_bench_replans_a_pool_under_load(server: str) -> None:
    """`q3serve bench --replan-at`: the re-plan happens while the load runs, and nothing fails."""
    workload = WorkloadConfig(num_prompts=8, input_len=16, output_len=32, thinking_share=1.0, seed=5)
    cfg = BenchConfig(url=server, backend="openai", model="m", api_key=KEY, request_rate=8.0, duration_s=60,
                      timeout_s=120, workload=workload, sampling=SamplingArgs(ignore_eos=True),
                      replan=ReplanConfig(at_s=1.0, pool="thinking", redundant=2))
    (run,) = bench(cfg, [8.0], progress=False)
    replan = run["replan"]
    assert replan["status"] == 200, replan
    assert replan["requests"]["in_flight"] > 0 and replan["requests"]["failed"] == 0
    assert run["summary"]["overall"]["completed"] == 8
