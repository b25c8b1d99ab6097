"""Two Ray nodes on one machine: attention shards pinned to one, expert groups to the other by
node resources in their placement-group bundles; the exchange crosses nodes and tokens match."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster import LLM, SamplingParams
from tests.helpers.models import hf_greedy, hf_model


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "resources": {"attention_node": 4}, "labels": {"q3serve-pool": "attention"}},
    )
    cluster.add_node(num_cpus=4, resources={"expert_node": 4}, labels={"q3serve-pool": "experts"})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


PINS = {
    "node-resources": dict(attention_resources={"attention_node": 1}, expert_resources={"expert_node": 1}),
    "node-labels": dict(attention_labels={"q3serve-pool": "attention"}, expert_labels={"q3serve-pool": "experts"}),
}


@pytest.mark.parametrize("pin", list(PINS))
def test_shards_and_groups_on_different_nodes(two_nodes, moe_checkpoint: Path, pin: str) -> None:
    llm = LLM(
        moe_checkpoint, attention_shards=2, expert_groups=2, dtype="float32", num_kv_blocks=64, block_size=4,
        placement_strategy="SPREAD", **PINS[pin],
    )
    try:
        ex = llm.core.executor
        shard_nodes = set(ex.call_all("node_id", actors=ex.shards))
        group_nodes = set(ex.call_all("node_id", actors=ex.groups))
        assert len(shard_nodes) == 1 and len(group_nodes) == 1 and shard_nodes != group_nodes
        prompts = [[5, 6, 7, 8], list(range(40, 70))]
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params)
        ref = hf_model(moe_checkpoint)
        assert [o.token_ids for o in outs] == [hf_greedy(ref, p, 10) for p in prompts]
    finally:
        llm.shutdown()
