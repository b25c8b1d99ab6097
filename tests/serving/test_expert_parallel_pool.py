"""An expert-parallel pool in Serve: the replica's placement group holds the replica and its
instance's attention shard and expert groups; requests are served through them."""

from __future__ import annotations

import openai
import pytest
import ray
from ray import serve

from tests.helpers.serving import ServeApp


@pytest.fixture(scope="module")
def server(serve_app: ServeApp) -> str:
    return serve_app(thinking={"attention_shards": 1, "expert_groups": 2}, fast={"enabled": False})


def test_instance_lives_in_the_replica_placement_group(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=60)
    resp = client.completions.create(model="m", prompt="expert parallel", max_tokens=6, temperature=0)
    assert resp.usage.completion_tokens == 6
    stats = serve.get_deployment_handle("thinking-pool", app_name="q3serve").stats.remote().result(timeout_s=30)
    pgs = ray.util.placement_group_table()
    replica_pg = pgs[stats["instance_placement_group"]]
    assert len(replica_pg["bundles"]) == 4 and replica_pg["state"] == "CREATED"  # replica + shard + 2 groups
    assert len([p for p in pgs.values() if p["state"] == "CREATED"]) == 1  # no second group was reserved
