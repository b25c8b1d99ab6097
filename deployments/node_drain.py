"""Draining the Ray node a Kubernetes pod is about to lose (the chart's worker preStop hook).

Kubernetes deletes worker pods for its own reasons (node maintenance, a RayService upgrade, the
autoscaler), and a pod that just dies cuts every stream of the replicas on it. Ray's drain API is
what its own autoscaler uses before it removes a node: marked draining with a deadline, the node
gets no new work, and Serve migrates its replicas (a replacement starts elsewhere first; the old
replica then stops gracefully, new requests go to others, in-flight ones get the deployment's
`graceful_shutdown_timeout_s`). Serve stops a draining replica at the latest at
`deadline - graceful_shutdown_timeout_s`, so a deadline inside the pod's termination grace
period bounds the whole thing. `drain_node` asks for that and waits until no Serve replica is left
on the node, so the container is stopped only after its requests ended.

Not covered: an expert-parallel instance whose actors span nodes is migrated only when its
replica actor sits on the draining node; an instance actor on a draining node under a replica
elsewhere dies with the node, and that replica fails its health check and is rebuilt (the fault
path of the fault tests)."""

from __future__ import annotations

import time

import ray

REPLICA_CLASS_PREFIX = "ServeReplica:"


def replicas_on_node(node_id: str, timeout_s: float = 10.0) -> list[str]:
    """Names of the Serve replica actors alive on `node_id` (from Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")], limit=10_000,
                         timeout=int(max(1, timeout_s)), raise_on_missing_output=False)
    return [a.name or a.class_name for a in actors if (a.class_name or "").startswith(REPLICA_CLASS_PREFIX)]


def request_drain(node_id: str, deadline_s: float, reason: str = "the pod is being deleted") -> None:
    """Marks the node draining with a deadline `deadline_s` from now (preemption: accepted even
    while the node is busy, unlike an idle-termination drain)."""
    # The call `ray drain-node` makes (Ray has no public Python API for it yet).
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    deadline_ms = int(time.time() * 1000 + deadline_s * 1000)
    gcs = GcsClient(address=ray.get_runtime_context().gcs_address)
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   reason, deadline_ms)
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id}: {why}")


def drain_node(node_id: str | None = None, deadline_s: float = 60.0, poll_s: float = 1.0,
               log=print) -> list[str]:
    """Drains `node_id` (default: this process's node) and waits until Serve has moved every
    replica off it or `deadline_s` passed. Returns the replicas still there at the end (empty when
    the drain finished). Needs a connected Ray driver (`ray.init(address="auto")`)."""
    node_id = node_id or ray.get_runtime_context().get_node_id()
    request_drain(node_id, deadline_s)
    end = time.monotonic() + deadline_s
    left = replicas_on_node(node_id)
    log(f"draining node {node_id[:12]}: {len(left)} Serve replica(s) on it, up to {deadline_s:g}s")
    while left and time.monotonic() < end:
        time.sleep(poll_s)
        try:
            left = replicas_on_node(node_id, timeout_s=min(10.0, max(1.0, end - time.monotonic())))
        except Exception as exc:  # noqa: BLE001 - the state API can time out under load; try again
            log(f"state API: {type(exc).__name__}: {exc}"[:200])
    log("drained" if not left else f"deadline passed with {len(left)} replica(s) left: {', '.join(left)}")
    return left
