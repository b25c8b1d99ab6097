"""`q3serve drain-node` (the chart's worker preStop hook) on a real three-node Ray cluster on this
machine: draining the node of a Serve replica moves the replica to the other worker node and
lets the request it is running finish; the command returns once nothing of Serve is left there."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from deployments.node_drain import drain_node, replicas_on_node


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": {"worker_slot": 1}},
                  graceful_shutdown_timeout_s=30, graceful_shutdown_wait_loop_s=0.5)
class Slow:
    async def __call__(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return ray.get_runtime_context().get_node_id()


@pytest.fixture(scope="module")
def three_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    workers = [cluster.add_node(num_cpus=2, resources={"worker_slot": 1}) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, workers
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_drain_moves_the_replica_and_lets_its_request_finish(three_nodes) -> None:
    _, workers = three_nodes
    handle = serve.run(Slow.bind(), name="drain", route_prefix=None)
    first = handle.remote(0.0).result(timeout_s=60)
    assert first in {w.node_id for w in workers}
    assert len(replicas_on_node(first)) == 1

    running = handle.remote(6.0)          # in flight on the replica about to be drained
    time.sleep(1.0)
    logs: list[str] = []
    start = time.monotonic()
    left = drain_node(first, deadline_s=90.0, poll_s=0.5, log=logs.append)
    took = time.monotonic() - start
    assert left == [], logs
    assert took < 85, logs                # it ended because Serve moved off, not at the deadline
    assert running.result(timeout_s=30) == first   # finished where it started, not cut
    other = handle.remote(0.0).result(timeout_s=60)
    assert other != first and other in {w.node_id for w in workers}
    assert replicas_on_node(first) == []
