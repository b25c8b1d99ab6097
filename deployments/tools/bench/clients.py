"""One request sent and timed as a streaming client sees it, over the OpenAI HTTP API
(completions or chat) or gRPC (Generate or Chat). Times are taken when a chunk with generated
text (content or reasoning) arrives, as `vllm bench serve` takes them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from deployments.tools.bench.workload import RequestSpec

BACKENDS = ("openai", "openai-chat", "grpc", "grpc-chat")


@dataclass
class SamplingArgs:
    """Sampling fields sent with every request; None leaves the server's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    ignore_eos: bool = False

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k))
                if v is not None}


@dataclass
class Record:
    """What one request measured; times in seconds."""

    index: int
    mode: str
    budget: int | None
    start_s: float = 0.0          # sent, from the run's start
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between successive chunks after the first
    e2el_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    pool: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    status: str | None = None     # a failed request's HTTP status / gRPC code (an error event's code mid-stream)
    retries: int = 0              # failed starts the server retried before this one served (x-q3serve-retries)
    end_s: float | None = None    # ended (completed or not), from the run's start

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft_s is not None


class _Timer:
    def __init__(self, record: Record, t0: float) -> None:
        self.record, self.t0, self.last = record, t0, None

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.record.ttft_s = now - self.t0
        else:
            self.record.itl_s.append(now - self.last)
        self.last = now

    def done(self) -> None:
        self.record.e2el_s = time.perf_counter() - self.t0


def thinking_budget(spec: RequestSpec, chat: bool) -> int | None:
    """The budget a request carries: its own; for a raw prompt in thinking mode without one, its
    output length (a raw prompt is in thinking mode when it carries a budget; this one never binds)."""
    if spec.mode != "thinking":
        return None
    return spec.budget if spec.budget is not None or chat else spec.output_len


def _thinking_fields(spec: RequestSpec, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if chat:
        body["chat_template_kwargs"] = {"enable_thinking": spec.mode == "thinking"}
    if (budget := thinking_budget(spec, chat)) is not None:
        body["thinking_budget"] = budget
    return body


async def send_http(client: httpx.AsyncClient, backend: str, model: str, spec: RequestSpec, sampling: SamplingArgs,
                    record: Record, timeout_s: float) -> None:
    chat = backend == "openai-chat"
    body: dict[str, Any] = {"model": model, "max_tokens": spec.output_len, "stream": True,
                            "stream_options": {"include_usage": True}, **sampling.fields(),
                            **_thinking_fields(spec, chat)}
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": spec.prompt_text}]
    else:
        body["prompt"] = spec.prompt_ids if spec.prompt_ids is not None else spec.prompt_text
    timer = _Timer(record, time.perf_counter())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with client.stream("POST", path, json=body, timeout=timeout_s) as r:
        record.pool = r.headers.get("x-q3serve-pool")
        record.retries = int(r.headers.get("x-q3serve-retries", 0))
        if r.status_code != 200:
            record.status = str(r.status_code)
            record.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                record.status = str(event["error"].get("code"))
                record.error = str(event["error"].get("message", event["error"]))[:200]
                return
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                text = (delta.get("content") or delta.get("reasoning_content")) if chat else choice.get("text")
                if text:
                    timer.chunk()
                if choice.get("finish_reason"):
                    record.finish_reason = choice["finish_reason"]
            usage = event.get("usage")
            if usage:
                record.prompt_tokens = usage.get("prompt_tokens", 0)
                record.output_tokens = usage.get("completion_tokens", 0)
                record.reasoning_tokens = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    timer.done()


def _retries(trailing: Any) -> int:
    """The server's x-q3serve-retries trailing metadata (gRPC's form of the HTTP header)."""
    return int(dict(trailing or ()).get("x-q3serve-retries", 0))


async def send_grpc(stub: Any, backend: str, model: str, spec: RequestSpec, sampling: SamplingArgs, record: Record,
                    timeout_s: float, metadata: list[tuple[str, str]]) -> None:
    import grpc

    from protos.q3serve.v1 import q3serve_pb2 as pb

    fields: dict[str, Any] = {"model": model, "max_tokens": spec.output_len, **sampling.fields()}
    if (budget := thinking_budget(spec, chat=backend == "grpc-chat")) is not None:
        fields["thinking_budget"] = budget
    if backend == "grpc-chat":
        if sampling.ignore_eos:
            raise ValueError("ignore_eos: gRPC Chat has no such field; use --backend grpc")
        call = stub.Chat(pb.ChatRequest(messages=[pb.Message(role="user", content=spec.prompt_text)],
                                        enable_thinking=spec.mode == "thinking", **fields),
                         timeout=timeout_s, metadata=metadata)
    else:
        prompt = {"token_ids": spec.prompt_ids} if spec.prompt_ids is not None else {"prompt": spec.prompt_text}
        call = stub.Generate(pb.GenerateRequest(ignore_eos=sampling.ignore_eos, **prompt, **fields),
                             timeout=timeout_s, metadata=metadata)
    timer = _Timer(record, time.perf_counter())
    try:
        async for chunk in call:
            record.pool = chunk.pool or record.pool
            text = chunk.text if backend == "grpc" else (chunk.content or chunk.reasoning_content)
            if text:
                timer.chunk()
            if chunk.finish_reason:
                record.finish_reason = chunk.finish_reason
                record.prompt_tokens = chunk.usage.prompt_tokens
                record.output_tokens = chunk.usage.completion_tokens
                record.reasoning_tokens = chunk.usage.reasoning_tokens
    except grpc.aio.AioRpcError as exc:
        record.status = exc.code().name
        record.error = f"gRPC {exc.code().name}: {exc.details()}"[:200]
        record.retries = _retries(exc.trailing_metadata())
        return
    record.retries = _retries(await call.trailing_metadata())
    timer.done()
