"""The HTTP guard (API keys, body size) as a plain ASGI middleware: what it refuses, in OpenAI's
error shape and counted, and that no route's response goes through Starlette's
BaseHTTPMiddleware (which pipes every streamed chunk through a memory stream and a task)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from starlette.middleware.base import BaseHTTPMiddleware

from deployments.api.openai_app import Guard, build_openai_app
from deployments.config import AppConfig
from deployments.frontend import Frontend


def test_guard_refuses_before_the_routes_and_counts_generation_refusals() -> None:
    frontend = Frontend(AppConfig(api_keys=["k"], limits={"max_request_bytes": 1024}), router=None)
    counted: list[tuple[str, int]] = []
    frontend.count_refused = lambda route, status: counted.append((route, status))  # type: ignore[method-assign]
    app = build_openai_app(frontend)
    assert [m.cls for m in app.user_middleware] == [Guard]
    assert not any(issubclass(m.cls, BaseHTTPMiddleware) for m in app.user_middleware)
    client = TestClient(app)
    r = client.post("/v1/completions", json={"model": "qwen3-moe", "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.post("/v1/chat/completions", content=b"x" * 2048,
                    headers={"authorization": "Bearer k", "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    r = client.post("/tokenize", json={"prompt": "hi"}, headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert client.get("/openapi.json").status_code == 200  # outside the guarded paths
    assert counted == [("completions", 401), ("chat", 413)]
