"""gRPC servicer methods behind Ray Serve's gRPC proxy: q3serve.v1.ChatService (Chat, Generate),
q3serve.v1.ModelService (ListModels) and grpc.health.v1.Health (Check). The proxy calls the
ingress deployment's method named after the RPC; the status codes are the ones gRPC users
expect: INVALID_ARGUMENT naming the field, UNAUTHENTICATED, RESOURCE_EXHAUSTED when queues are
full, UNAVAILABLE when no pool can serve. A client deadline or cancel ends the request on the
pool, which frees its KV blocks."""

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from deployments.chat import StreamingReasoningParser, reasoning_tokens
from deployments.router import Overloaded, PoolsUnavailable, RequestError
from protos.q3serve.v1 import q3serve_pb2 as pb

SERVICER_FUNCTIONS = [
    "protos.q3serve.v1.q3serve_pb2_grpc.add_ChatServiceServicer_to_server",
    "protos.q3serve.v1.q3serve_pb2_grpc.add_ModelServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
ROLES = ("system", "user", "assistant")


class GrpcAbort(Exception):
    """Ends an RPC with the status code already set on the context."""


def _abort(ctx: Any, code: grpc.StatusCode, message: str) -> GrpcAbort:
    ctx.set_code(code)
    ctx.set_details(message)
    return GrpcAbort(message)


def _opt(msg: Any, field: str) -> Any:
    return getattr(msg, field) if msg.HasField(field) else None


class GrpcMethods:
    """Mixed into the router's ingress, which provides cfg, keys, chat_prompt, start, tokenizer."""

    def _authorize(self, ctx: Any) -> None:
        metadata = dict(ctx.invocation_metadata())
        if not self.keys.check(metadata.get("authorization")):  # type: ignore[attr-defined]
            raise _abort(ctx, grpc.StatusCode.UNAUTHENTICATED, "authorization: missing or invalid API key")

    def _check_model(self, ctx: Any, model: str) -> None:
        served = self.cfg.served_model_name  # type: ignore[attr-defined]
        if model and model != served:
            raise _abort(ctx, grpc.StatusCode.NOT_FOUND, f"model: '{model}' does not exist; this server serves '{served}'")

    def _sampling(self, ctx: Any, req: Any, max_tokens: int | None) -> dict[str, Any]:
        budget = _opt(req, "thinking_budget")
        checks = [("max_tokens", max_tokens is not None and max_tokens <= 0),
                  ("thinking_budget", budget is not None and budget < 0),
                  ("temperature", req.HasField("temperature") and not 0 <= req.temperature <= 2),
                  ("top_p", req.HasField("top_p") and not 0 < req.top_p <= 1),
                  ("top_k", req.HasField("top_k") and req.top_k < 0),
                  ("stop", any(not s for s in req.stop))]
        for field, bad in checks:
            if bad:
                raise _abort(ctx, grpc.StatusCode.INVALID_ARGUMENT, f"{field}: invalid value")
        return dict(
            max_tokens=max_tokens, temperature=req.temperature if req.HasField("temperature") else 1.0,
            top_p=req.top_p if req.HasField("top_p") else 1.0, top_k=req.top_k if req.HasField("top_k") else 0,
            seed=_opt(req, "seed"), stop=list(req.stop), thinking_budget=budget,
        )

    async def _open(self, ctx: Any, ids: list[int], params: dict[str, Any], thinking: bool, param: str
                    ) -> tuple[str, AsyncIterator[dict[str, Any]]]:
        try:
            return await self.start(ids, params, thinking, param)  # type: ignore[attr-defined]
        except RequestError as exc:
            raise _abort(ctx, grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except Overloaded as exc:
            raise _abort(ctx, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except PoolsUnavailable as exc:
            raise _abort(ctx, grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    @staticmethod
    def _grpc_usage(last: dict[str, Any], thinking: bool) -> pb.Usage:
        return pb.Usage(prompt_tokens=last["prompt_tokens"], completion_tokens=last["completion_tokens"],
                        reasoning_tokens=reasoning_tokens(last, thinking))

    # -- q3serve.v1.ChatService -----------------------------------------------------------------
    async def Chat(self, request: pb.ChatRequest, grpc_context: Any) -> AsyncIterator[pb.ChatChunk]:  # noqa: N802
        self._authorize(grpc_context)
        self._check_model(grpc_context, request.model)
        if not request.messages:
            raise _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, "messages: at least one message is required")
        for i, m in enumerate(request.messages):
            if m.role not in ROLES:
                raise _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"messages[{i}].role: '{m.role}' is not one of {', '.join(ROLES)}")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        params = self._sampling(grpc_context, request, _opt(request, "max_tokens"))
        thinking, ids = self.chat_prompt(messages, _opt(request, "enable_thinking"))  # type: ignore[attr-defined]
        pool, chunks = await self._open(grpc_context, ids, params, thinking, "messages")
        parser = StreamingReasoningParser()
        async for c in chunks:
            done = c["finished"]
            reasoning, content = parser.feed(c["delta_text"], final=done) if thinking else ("", c["delta_text"])
            if not (reasoning or content or done):
                continue
            chunk = pb.ChatChunk(reasoning_content=reasoning, content=content, pool=pool)
            if done:
                chunk.finish_reason = c["finish_reason"] or ""
                chunk.usage.CopyFrom(self._grpc_usage(c, thinking))
            yield chunk

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any) -> AsyncIterator[pb.GenerateChunk]:  # noqa: N802
        self._authorize(grpc_context)
        self._check_model(grpc_context, request.model)
        if request.token_ids:
            ids = list(request.token_ids)
        elif request.prompt:
            ids = self.tokenizer.encode(request.prompt, add_special_tokens=False)  # type: ignore[attr-defined]
        else:
            raise _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, "prompt: give prompt text or token_ids")
        params = self._sampling(grpc_context, request, _opt(request, "max_tokens"))
        params.update(stop_token_ids=list(request.stop_token_ids), ignore_eos=request.ignore_eos)
        thinking = params["thinking_budget"] is not None
        pool, chunks = await self._open(grpc_context, ids, params, thinking, "token_ids" if request.token_ids else "prompt")
        async for c in chunks:
            chunk = pb.GenerateChunk(token_ids=c["delta_token_ids"], text=c["delta_text"], pool=pool)
            if c["finished"]:
                chunk.finish_reason = c["finish_reason"] or ""
                chunk.usage.CopyFrom(self._grpc_usage(c, thinking))
            yield chunk

    # -- q3serve.v1.ModelService ----------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: Any) -> pb.ListModelsResponse:  # noqa: N802
        self._authorize(grpc_context)
        return pb.ListModelsResponse(models=[pb.Model(id=self.cfg.served_model_name, owned_by="q3serve")])  # type: ignore[attr-defined]

    # -- grpc.health.v1.Health (open, like /health) -----------------------------------------------
    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: Any) -> health_pb2.HealthCheckResponse:  # noqa: N802
        ready = await self.router.ready()  # type: ignore[attr-defined]
        serving = bool(ready) and all(ready.values())
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
