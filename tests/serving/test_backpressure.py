"""Full queues: when the fast pool refuses a request (Serve's max_queued_requests reached) the
thinking pool serves it; when both refuse, HTTP says 429 and gRPC RESOURCE_EXHAUSTED at once."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from tests.helpers.serving import GRPC_PORT, ServeApp

ONE_AT_A_TIME = {"max_ongoing_requests": 1, "max_queued_requests": 1}


@pytest.fixture(scope="module")
def server(serve_app: ServeApp) -> str:
    return serve_app(thinking=ONE_AT_A_TIME, fast=ONE_AT_A_TIME)


def test_full_fast_queue_spills_to_thinking(server: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "ignore_eos": True,
            "enable_thinking": False}
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(httpx.post, f"{server}/v1/chat/completions", json=body, timeout=120) for _ in range(6)]
        responses = [f.result() for f in futures]
    served_by = [r.headers["x-q3serve-pool"] for r in responses if r.status_code == 200]
    assert "fast" in served_by and "thinking" in served_by, served_by
    refused = [r for r in responses if r.status_code != 200]
    assert refused and all(r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error" for r in refused)
    # and the server still serves
    ok = httpx.post(f"{server}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_grpc_resource_exhausted(server: str) -> None:
    import grpc

    from deployments.grpc_client import Q3ServeClient

    def one() -> grpc.StatusCode:
        client = Q3ServeClient(f"127.0.0.1:{GRPC_PORT['port']}")
        try:
            list(client.generate([1, 2, 3], max_tokens=300, ignore_eos=True, timeout=120))
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()
        finally:
            client.close()

    with cf.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: one(), range(6)))
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
