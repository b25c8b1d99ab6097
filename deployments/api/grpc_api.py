"""gRPC over the Frontend, behind Ray Serve's gRPC proxy: q3serve.v1.ChatService (Chat, Generate),
q3serve.v1.ModelService (ListModels) and grpc.health.v1.Health (Check). The ingress exposes
these as its methods named after the RPCs (which is how the proxy finds them) and hands them to
`GrpcApi`. Status codes are the ones gRPC users expect: INVALID_ARGUMENT naming the field,
UNAUTHENTICATED, NOT_FOUND for an unknown model, RESOURCE_EXHAUSTED when queues are full,
UNAVAILABLE when no pool can serve. A client deadline or cancel ends the request on the pool,
which frees its KV blocks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from cluster.config import StructuredOutput
from deployments.frontend import (Delta, Frontend, FrontRequest, InstanceLost, ModelNotFound, Overloaded, PoolsUnavailable,
                                  RequestError, SamplingFields, Unauthenticated, Usage)
from protos.q3serve.v1 import q3serve_pb2 as pb

SERVICER_FUNCTIONS = [
    "protos.q3serve.v1.q3serve_pb2_grpc.add_ChatServiceServicer_to_server",
    "protos.q3serve.v1.q3serve_pb2_grpc.add_ModelServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
ROLES = ("system", "user", "assistant", "tool")
STATUS = {
    RequestError: grpc.StatusCode.INVALID_ARGUMENT, ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED, Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PoolsUnavailable: grpc.StatusCode.UNAVAILABLE,
}


class GrpcAbort(Exception):
    """Ends an RPC with the status code already set on the context."""


def _abort(ctx: Any, exc: Exception) -> GrpcAbort:
    """Sets the status of a Frontend error on the context (Serve then keeps it)."""
    code = next(c for t, c in STATUS.items() if isinstance(exc, t))
    ctx.set_code(code)
    ctx.set_details(str(exc))
    return GrpcAbort(str(exc))


async def _unavailable_on_loss(deltas: AsyncIterator[Delta], ctx: Any) -> AsyncIterator[Delta]:
    """The deltas; a pool that fails mid-stream ends the RPC with UNAVAILABLE (retriable)."""
    try:
        async for d in deltas:
            yield d
    except InstanceLost as exc:
        raise _abort(ctx, exc) from None


def _retried(ctx: Any, retries: int) -> None:
    """How many failed starts the server retried before this one served, as trailing metadata
    (x-q3serve-retries, the HTTP header's name; Serve's proxy sends what the replica set)."""
    if retries:
        ctx.set_trailing_metadata([("x-q3serve-retries", str(retries))])


def _opt(msg: Any, field: str) -> Any:
    return getattr(msg, field) if msg.HasField(field) else None


def _usage(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    reasoning_tokens=u.reasoning_tokens)


def _message(m: pb.Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}}
                             for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    out = []
    for i, t in enumerate(tools):
        fn: dict[str, Any] = {"name": t.name, "description": t.description}
        if t.parameters_json:
            try:
                fn["parameters"] = json.loads(t.parameters_json)
            except ValueError:
                raise RequestError(f"tools[{i}].parameters_json", "is not valid JSON") from None
        out.append({"type": "function", "function": fn})
    return out or None


def _tool_choice(choice: str) -> Any:
    if choice in ("", "auto", "none", "required"):
        return choice or None
    return {"type": "function", "function": {"name": choice}}


def _whole_calls(deltas: list[dict[str, Any]]) -> list[pb.ToolCall]:
    """The streaming tool parser's deltas (name, then arguments) as whole calls."""
    calls: dict[int, pb.ToolCall] = {}
    for d in deltas:
        if "id" in d:
            calls[d["index"]] = pb.ToolCall(id=d["id"], name=d["function"]["name"])
        else:
            calls[d["index"]].arguments += d["function"]["arguments"]
    return list(calls.values())


def _constraint(req: Any) -> StructuredOutput | None:
    """The request's OutputConstraint as the engine's StructuredOutput."""
    if not req.HasField("constraint"):
        return None
    c = req.constraint
    kind = c.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_object":
        return StructuredOutput("json_object", param="constraint.json_object")
    if kind == "choice":  # the engine refuses an empty list
        return StructuredOutput("choice", json.dumps(list(c.choice.values)), "constraint.choice")
    value = getattr(c, kind)
    if not value:
        raise RequestError(f"constraint.{kind}", "must not be empty")
    return StructuredOutput(kind, value, f"constraint.{kind}")


def _fields(req: Any, **extra: Any) -> SamplingFields:
    return SamplingFields(
        max_tokens=_opt(req, "max_tokens"), temperature=_opt(req, "temperature"), top_p=_opt(req, "top_p"),
        top_k=_opt(req, "top_k"), seed=_opt(req, "seed"), stop=list(req.stop), thinking_budget=_opt(req, "thinking_budget"),
        presence_penalty=_opt(req, "presence_penalty"), frequency_penalty=_opt(req, "frequency_penalty"),
        repetition_penalty=_opt(req, "repetition_penalty"), **extra,
    )


class GrpcApi:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    def _begin(self, ctx: Any, model: str, generates: bool = False) -> None:
        """The key, then (for a generation call) capacity, then the model's name."""
        metadata = dict(ctx.invocation_metadata())
        self.frontend.authorize(metadata.get("authorization"))
        if generates:
            self.frontend.check_capacity()
        self.frontend.check_model(model)

    # -- q3serve.v1.ChatService -----------------------------------------------------------------
    async def chat(self, request: pb.ChatRequest, ctx: Any) -> AsyncIterator[pb.ChatChunk]:
        try:
            with self.frontend.refusals("grpc_chat"):
                self._begin(ctx, request.model, generates=True)
                if not request.messages:
                    raise RequestError("messages", "at least one message is required")
                for i, m in enumerate(request.messages):
                    if m.role not in ROLES:
                        raise RequestError(f"messages[{i}].role", f"'{m.role}' is not one of {', '.join(ROLES)}")
                req = FrontRequest("grpc_chat", "messages", messages=[_message(m) for m in request.messages],
                                   tools=_tools(request.tools), tool_choice=_tool_choice(request.tool_choice),
                                   parallel_tool_calls=request.parallel_tool_calls, thinking=_opt(request, "enable_thinking"),
                                   sampling=_fields(request), constraint=_constraint(request))
                opened = await self.frontend.open(req)
        except tuple(STATUS) as exc:
            raise _abort(ctx, exc) from None
        _retried(ctx, opened.retries)
        async for d in _unavailable_on_loss(opened.deltas(), ctx):
            calls = _whole_calls(d.tool_calls)
            if not (d.reasoning or d.content or calls or d.finished):
                continue
            chunk = pb.ChatChunk(reasoning_content=d.reasoning, content=d.content, pool=opened.pool, tool_calls=calls)
            if d.finished:
                chunk.finish_reason = d.finish_reason or ""
                chunk.usage.CopyFrom(_usage(d.usage))
            yield chunk

    async def generate(self, request: pb.GenerateRequest, ctx: Any) -> AsyncIterator[pb.GenerateChunk]:
        try:
            with self.frontend.refusals("grpc_generate"):
                self._begin(ctx, request.model, generates=True)
                if request.token_ids:
                    prompt, param = list(request.token_ids), "token_ids"
                elif request.prompt:
                    prompt, param = request.prompt, "prompt"
                else:
                    raise RequestError("prompt", "give prompt text or token_ids")
                fields = _fields(request, stop_token_ids=list(request.stop_token_ids), ignore_eos=request.ignore_eos)
                req = FrontRequest("grpc_generate", param, prompt=prompt, sampling=fields, constraint=_constraint(request))
                opened = await self.frontend.open(req)
        except tuple(STATUS) as exc:
            raise _abort(ctx, exc) from None
        _retried(ctx, opened.retries)
        async for d in _unavailable_on_loss(opened.deltas(), ctx):
            chunk = pb.GenerateChunk(token_ids=d.token_ids, text=d.content, pool=opened.pool)
            if d.finished:
                chunk.finish_reason = d.finish_reason or ""
                chunk.usage.CopyFrom(_usage(d.usage))
            yield chunk

    # -- q3serve.v1.ModelService ----------------------------------------------------------------
    async def list_models(self, request: pb.ListModelsRequest, ctx: Any) -> pb.ListModelsResponse:
        try:
            self._begin(ctx, "")
        except Unauthenticated as exc:
            raise _abort(ctx, exc) from None
        return pb.ListModelsResponse(models=[pb.Model(id=self.frontend.model_name, owned_by="q3serve")])

    # -- grpc.health.v1.Health (open, like /health) -----------------------------------------------
    async def check(self, request: health_pb2.HealthCheckRequest, ctx: Any) -> health_pb2.HealthCheckResponse:
        ready = await self.frontend.router.ready()
        serving = bool(ready) and all(ready.values())
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
