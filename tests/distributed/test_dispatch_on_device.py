"""The expert-parallel exchange creates every tensor on the model's device (DESIGN.md's device
rules), in two processes over gloo: the check of tests/unit/test_device_hygiene.py (default device
`meta`, every op's output checked) in each rank."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.device import OnlyOnModelDevice


def _exchange_rank(rank: int, port: int, colocated: bool, results) -> None:  # noqa: ANN001 - a multiprocessing queue
    """One rank of a two-rank instance under the check, inputs made before it as the model's
    would be. Separate layout: rank 0 dispatches a MoE layer's rows and rank 1 serves them.
    Colocated: both ranks dispatch their own tokens and serve half the experts each."""
    import torch.distributed as dist

    from cluster.parallel.dispatch import Exchange
    from cluster.parallel.placement import contiguous

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        w_gate_up, w_down = torch.randn(4, 8, 12), torch.randn(4, 6, 8)
        torch.manual_seed(1 + rank)
        x, ids, weights = torch.randn(5, 8), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
        if colocated:
            exchange = Exchange(rank, 2, 2, contiguous(4, 2, 1), "cpu", colocated=True)
            exchange.experts = [(w_gate_up[2 * rank : 2 * rank + 2], w_down[2 * rank : 2 * rank + 2])]
        else:
            exchange = Exchange(rank, 1, 1, contiguous(4, 1, 1), "cpu")
            if rank == 1:
                exchange.experts = [(w_gate_up, w_down)]
        dispatches = colocated or rank == 0
        with torch.inference_mode(), OnlyOnModelDevice() as mode:
            if dispatches:
                out = exchange.dispatch(0, x, ids, weights)
            else:
                exchange.serve(0, torch.float32)
        if dispatches:
            ref = torch.stack([sum(weights[t, j] * (torch.nn.functional.silu(x[t] @ w_gate_up[e][:, :6]) * (x[t] @ w_gate_up[e][:, 6:])) @ w_down[e]
                                   for j, e in enumerate(ids[t].tolist())) for t in range(5)])
            results.put((rank, mode.strays, torch.allclose(out, ref, atol=1e-4)))
        else:
            results.put((rank, mode.strays, True))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("colocated", [False, True], ids=["separate", "colocated"])
def test_expert_parallel_dispatch_stays_on_device(colocated: bool) -> None:
    """The all_to_all exchange of one MoE layer (counts, packed rows, results), shard and group
    side (or both on each rank), in two processes over gloo, makes nothing off the device and
    returns the experts' sum."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_exchange_rank, args=(r, port, colocated, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = sorted(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [g[0] for g in got] == [0, 1]
    assert got[0][1] == [] and got[1][1] == [], (got[0][1][:5], got[1][1][:5])
    assert got[0][2] and got[1][2], "dispatched experts differ from the local reference"
