"""OpenAI-compatible HTTP (FastAPI ingress): /v1/chat/completions, /v1/completions, /v1/models,
/health. Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}; the pool
that served a request is in the `x-q3serve-pool` header."""


import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from ray import serve

from cluster.config import ModelConfig
from cluster.default_model import default_model_path
from cluster.engine.tokenizer import load_tokenizer, render_chat
from deployments.chat import Parsed, StreamingReasoningParser, decide_thinking, reasoning_tokens, split_reasoning
from deployments.auth import ApiKeys, load_keys
from deployments.config import AppConfig
from deployments.grpc_api import GrpcMethods
from deployments.metrics import RouterMetrics
from deployments.router import Overloaded, PoolRouter, PoolsUnavailable, RequestError


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field(None, validate_default=True)
    reasoning_content: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: str | None, info: ValidationInfo) -> str:
        """Qwen3's template reads every message's content; as in OpenAI's API, only an assistant
        turn (one that made tool calls) may leave it out."""
        if value is not None:
            return value
        role = info.data.get("role")
        if role != "assistant":
            raise ValueError(f"required for a '{role}' message")
        return ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients pass unknown extras through; ignore them
    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def sampling(self, max_tokens: int | None, logprobs: bool, budget: int | None) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
                    min_p=self.min_p, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos, logprobs=logprobs,
                    thinking_budget=budget)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool = False
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = Field(None, ge=0)
    max_think_tokens: int | None = Field(None, ge=0)
    thinking_token_budget: int | None = Field(None, ge=0)

    def budget(self) -> int | None:
        for v in (self.thinking_budget, self.max_think_tokens, self.thinking_token_budget):
            if v is not None:
                return v
        return None

    def explicit_thinking(self) -> bool | None:
        if self.enable_thinking is not None:
            return self.enable_thinking
        value = (self.chat_template_kwargs or {}).get("enable_thinking")
        return None if value is None else bool(value)


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=1)
    thinking_budget: int | None = Field(None, ge=0)  # applies when the raw prompt leaves <think> open


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


def build_fastapi() -> FastAPI:
    app = FastAPI(title="q3serve", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param)

    @app.middleware("http")
    async def _guard(request: Request, call_next):  # noqa: ANN001, ANN202
        """API keys and body size for /v1; /health stays open (and Ray's metrics port too)."""
        state = request.app.state
        if request.url.path.startswith("/v1/") and hasattr(state, "keys"):
            if not state.keys.check(request.headers.get("authorization")):
                return error(401, "authorization: missing or invalid API key (send 'Authorization: Bearer <key>')",
                             "authorization", "authentication_error")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > state.max_request_bytes:
                return error(413, f"body: {size} bytes exceed the limit of {state.max_request_bytes}", "body")
        return await call_next(request)

    return app


app = build_fastapi()


@serve.ingress(app)
class OpenAIIngress(GrpcMethods):
    """The router's front: OpenAI HTTP here, gRPC methods from GrpcMethods (Serve's gRPC proxy
    calls the ingress deployment's method named after the RPC)."""

    def __init__(self, cfg: AppConfig, handles: dict[str, Any], app_name: str = "q3serve") -> None:
        self.cfg = cfg
        self.router = PoolRouter(cfg, handles, app_name)
        self.keys = ApiKeys(load_keys(cfg.api_keys))
        app.state.keys = self.keys
        app.state.max_request_bytes = cfg.limits.max_request_bytes
        model_path = cfg.model or str(default_model_path())
        self.tokenizer = load_tokenizer(model_path)
        mc = ModelConfig.from_pretrained(model_path)
        context = min(min(p.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
                      for p in cfg.pools().values())
        self.prompt_limit = min(context - 1, cfg.limits.max_prompt_tokens or context)
        self.created = int(time.time())
        self.metrics = RouterMetrics()

    # -- routes ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        ready = await self.router.ready()
        return JSONResponse({"pools": ready}, status_code=200 if ready and all(ready.values()) else 503)

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": self.cfg.served_model_name, "object": "model", "created": self.created, "owned_by": "q3serve"}
        ]}

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest) -> Any:
        if body.model != self.cfg.served_model_name:
            return error(404, f"model: '{body.model}' does not exist; this server serves '{self.cfg.served_model_name}'", "model", "not_found_error")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        thinking, ids = self.chat_prompt(messages, body.explicit_thinking())
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = body.sampling(max_tokens, body.logprobs, body.budget())
        return await self._serve("chat", body, ids, params, thinking)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        if body.model != self.cfg.served_model_name:
            return error(404, f"model: '{body.model}' does not exist; this server serves '{self.cfg.served_model_name}'", "model", "not_found_error")
        ids = body.prompt if isinstance(body.prompt, list) else self.tokenizer.encode(body.prompt, add_special_tokens=False)
        params = body.sampling(body.max_tokens, bool(body.logprobs), body.thinking_budget)
        return await self._serve("completion", body, ids, params, thinking=body.thinking_budget is not None)

    # -- plumbing -------------------------------------------------------------------------------
    # -- shared with the gRPC methods --------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, Any]], explicit: bool | None) -> tuple[bool, list[int]]:
        """Thinking mode and the prompt ids, through Qwen3's own template."""
        thinking = decide_thinking(explicit, messages, self.cfg.router.default_thinking)
        prompt = render_chat(self.tokenizer, messages, enable_thinking=thinking)
        return thinking, self.tokenizer.encode(prompt, add_special_tokens=False)

    async def start(self, ids: list[int], params: dict[str, Any], thinking: bool, param: str,
                    request_id: str | None = None) -> tuple[str, AsyncIterator[dict[str, Any]]]:
        """Checks the prompt against the limits and starts it on a pool. Raises RequestError,
        Overloaded or PoolsUnavailable."""
        if len(ids) > self.prompt_limit:
            raise RequestError(f"{param}: the prompt is {len(ids)} tokens, over the limit of {self.prompt_limit}", param)
        try:
            return await self.router.stream(ids, params, thinking, request_id or f"req-{uuid.uuid4().hex}")
        except (RequestError, Overloaded, PoolsUnavailable):
            raise
        except ValueError as exc:  # a pool rejected the request's content
            raise RequestError(str(exc).splitlines()[-1]) from None

    # -- plumbing -------------------------------------------------------------------------------
    async def _serve(self, kind: str, body: _Sampling, ids: list[int], params: dict[str, Any], thinking: bool) -> Any:
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        route = "chat" if kind == "chat" else "completions"
        start = time.monotonic()
        try:
            pool, chunks = await self.start(ids, params, thinking, "messages" if kind == "chat" else "prompt", rid)
        except RequestError as exc:
            return self._failed(route, error(400, str(exc), exc.param))
        except Overloaded as exc:
            return self._failed(route, error(429, str(exc), kind="rate_limit_error"))
        except PoolsUnavailable as exc:
            return self._failed(route, error(503, str(exc), kind="service_unavailable"))
        chunks = self._measured(chunks, {"pool": pool, "route": route}, start)
        headers = {"x-q3serve-pool": pool}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            gen = self._sse(kind, rid, chunks, thinking, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
        return JSONResponse(await self._collect(kind, rid, chunks, thinking), headers=headers)

    def _failed(self, route: str, response: JSONResponse) -> JSONResponse:
        self.metrics.requests.inc(1, tags={"pool": "none", "route": route, "status": str(response.status_code)})
        return response

    async def _measured(self, chunks: AsyncIterator[dict[str, Any]], tags: dict[str, str], start: float
                        ) -> AsyncIterator[dict[str, Any]]:
        """Passes chunks through, recording TTFT, inter-token latency, tokens and latency."""
        last_t, last = None, {}
        status = "cancelled"
        try:
            async for c in chunks:
                now = time.monotonic()
                if last_t is None:
                    self.metrics.ttft.observe(now - start, tags=tags)
                else:
                    self.metrics.itl.observe(now - last_t, tags=tags)
                last_t, last = now, c
                yield c
            status = "200"
        finally:
            self.metrics.requests.inc(1, tags={**tags, "status": status})
            self.metrics.latency.observe(time.monotonic() - start, tags=tags)
            if last:
                self.metrics.tokens_in.inc(last["prompt_tokens"], tags=tags)
                self.metrics.tokens_out.inc(last["completion_tokens"], tags=tags)

    def _usage(self, last: dict[str, Any], thinking: bool) -> dict[str, Any]:
        completion = last["completion_tokens"]
        reasoning = reasoning_tokens(last, thinking)
        return {"prompt_tokens": last["prompt_tokens"], "completion_tokens": completion,
                "total_tokens": last["prompt_tokens"] + completion,
                "completion_tokens_details": {"reasoning_tokens": reasoning}}

    async def _collect(self, kind: str, rid: str, chunks: AsyncIterator[dict[str, Any]], thinking: bool) -> dict[str, Any]:
        text, lps, ids, last = "", [], [], {}
        async for c in chunks:
            text += c["delta_text"]
            lps += c["logprobs"]
            ids += c["delta_token_ids"]
            last = c
        base = {"id": rid, "created": int(time.time()), "model": self.cfg.served_model_name,
                "usage": self._usage(last, thinking), "q3serve_pool": last.get("pool")}
        if kind == "completion":
            choice = {"index": 0, "text": text, "finish_reason": last["finish_reason"],
                      "logprobs": {"token_logprobs": lps} if lps else None}
            return {**base, "object": "text_completion", "choices": [choice]}
        # With thinking off the template closed <think> in the prompt: all output is content.
        parsed = split_reasoning(text) if thinking else Parsed(None, text)
        message = {"role": "assistant", "content": parsed.content}
        if parsed.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning
        choice = {"index": 0, "message": message, "finish_reason": last["finish_reason"],
                  "logprobs": {"content": [
                      {"token": self.tokenizer.decode([t]), "logprob": lp, "bytes": None, "top_logprobs": []}
                      for t, lp in zip(ids, lps)
                  ]} if lps else None}
        return {**base, "object": "chat.completion", "choices": [choice]}

    async def _sse(self, kind: str, rid: str, chunks: AsyncIterator[dict[str, Any]], thinking: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.cfg.served_model_name
        parser = StreamingReasoningParser()
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        last: dict[str, Any] = {}

        def event(choice: dict[str, Any], **extra: Any) -> str:
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                          "choices": [choice], **extra}) + "\n\n"

        if kind == "chat":
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for c in chunks:
            last = c
            done = c["finished"]
            if kind == "completion":
                if c["delta_text"] or done:
                    yield event({"index": 0, "text": c["delta_text"], "finish_reason": c["finish_reason"] if done else None})
                continue
            reasoning, content = parser.feed(c["delta_text"], final=done) if thinking else ("", c["delta_text"])
            delta: dict[str, Any] = {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            if delta or done:
                yield event({"index": 0, "delta": delta, "finish_reason": c["finish_reason"] if done else None})
        if include_usage and last:
            yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                         "choices": [], "usage": self._usage(last, thinking)}) + "\n\n"
        yield "data: [DONE]\n\n"
