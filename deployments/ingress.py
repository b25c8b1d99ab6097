"""The Serve ingress deployment: one class that takes both protocols over one Frontend. HTTP is
the FastAPI app `build_openai_app` makes for this replica's Frontend (Serve asks for it through
`__serve_build_asgi_app__` once the replica is constructed); gRPC arrives as calls of the methods
named after the RPCs, which hand over to `GrpcApi`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from grpc_health.v1 import health_pb2
from ray import serve

from deployments.api.grpc_api import GrpcApi
from deployments.api.openai_app import build_openai_app
from deployments.config import AppConfig
from deployments.frontend import Frontend
from deployments.router import PoolRouter
from protos.q3serve.v1 import q3serve_pb2 as pb


@serve.ingress()
class Ingress:
    def __init__(self, cfg: AppConfig, handles: dict[str, Any], app_name: str = "q3serve") -> None:
        self.frontend = Frontend(cfg, PoolRouter(cfg, handles, app_name))
        self.grpc = GrpcApi(self.frontend)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_openai_app(self.frontend)

    async def drain(self, grace_s: float) -> int:
        """`q3serve up`'s shutdown: refuse new requests, let those in flight finish for up to
        `grace_s`; returns how many were still running."""
        return await self.frontend.drain(grace_s)

    # -- gRPC: q3serve.v1.ChatService, q3serve.v1.ModelService, grpc.health.v1.Health ------------
    async def Chat(self, request: pb.ChatRequest, grpc_context: Any) -> AsyncIterator[pb.ChatChunk]:  # noqa: N802
        async for chunk in self.grpc.chat(request, grpc_context):
            yield chunk

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any) -> AsyncIterator[pb.GenerateChunk]:  # noqa: N802
        async for chunk in self.grpc.generate(request, grpc_context):
            yield chunk

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: Any) -> pb.ListModelsResponse:  # noqa: N802
        return await self.grpc.list_models(request, grpc_context)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: Any) -> health_pb2.HealthCheckResponse:  # noqa: N802
        return await self.grpc.check(request, grpc_context)
