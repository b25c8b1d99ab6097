"""A small Python client for q3serve's gRPC API (used by `q3serve chat --grpc`, tests and
benchmarks). Every call takes a timeout, sent to the server as the gRPC deadline."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.q3serve.v1 import q3serve_pb2 as pb
from protos.q3serve.v1 import q3serve_pb2_grpc as pb_grpc


class Q3ServeClient:
    def __init__(self, target: str = "127.0.0.1:9000", api_key: str | None = None) -> None:
        self.channel = grpc.insecure_channel(target)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self.chat_stub = pb_grpc.ChatServiceStub(self.channel)
        self.models_stub = pb_grpc.ModelServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def chat(self, messages: list[dict[str, str]], timeout: float = 600, **fields: Any) -> Iterator[pb.ChatChunk]:
        request = pb.ChatRequest(messages=[pb.Message(**m) for m in messages], **fields)
        return self.chat_stub.Chat(request, timeout=timeout, metadata=self.metadata)

    def generate(self, prompt: str | list[int], timeout: float = 600, **fields: Any) -> Iterator[pb.GenerateChunk]:
        request = pb.GenerateRequest(token_ids=prompt, **fields) if isinstance(prompt, list) else pb.GenerateRequest(prompt=prompt, **fields)
        return self.generate_stub_call(request, timeout)

    def generate_stub_call(self, request: pb.GenerateRequest, timeout: float) -> Iterator[pb.GenerateChunk]:
        return self.chat_stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def list_models(self, timeout: float = 30) -> list[str]:
        return [m.id for m in self.models_stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=self.metadata).models]

    def health(self, timeout: float = 10) -> int:
        """grpc.health.v1 status: 1 = SERVING, 2 = NOT_SERVING."""
        return self.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status

    def close(self) -> None:
        self.channel.close()
