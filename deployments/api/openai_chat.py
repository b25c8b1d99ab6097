"""OpenAI-compatible HTTP over the Frontend: /v1/chat/completions, /v1/completions, /v1/models,
/health, and vLLM's /tokenize and /detokenize. Request and response shapes and SSE live here; everything else is the Frontend's.
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}; the pool that served a
request is in the `x-q3serve-pool` header."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from cluster import SamplingParams
from cluster.config import StructuredOutput
from deployments.admin_api import add_admin_routes
from deployments.chat import Parsed, StreamingReasoningParser, split_reasoning
from deployments.frontend import (Frontend, InstanceLost, ModelNotFound, Overloaded, PoolsUnavailable, RequestError, Routed,
                                  Unauthenticated)
from deployments.pool import PoolChunk
from deployments.tool_calls import StreamingToolParser, check_tools, constrain_to_tools, parse_tool_calls


class ContentPart(BaseModel):
    """One part of a message's content as OpenAI's SDKs send it ({"type": "text", "text": ...});
    this model reads text only."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(None, validate_default=True)
    reasoning_content: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: str | list[ContentPart] | None, info: ValidationInfo) -> str:
        """Qwen3's template reads every message's content as text: a list of text parts is
        joined with newlines (as vLLM does), any other part is refused naming its type. As in
        OpenAI's API, only an assistant turn (one that made tool calls) may leave content out."""
        if isinstance(value, list):
            for j, part in enumerate(value):
                if part.type != "text":
                    raise ValueError(f"part {j} has type {part.type!r}; this model reads only 'text' parts")
                if part.text is None:
                    raise ValueError(f"part {j} of type 'text' has no 'text'")
            return "\n".join(part.text or "" for part in value)
        if value is not None:
            return value
        role = info.data.get("role")
        if role != "assistant":
            raise ValueError(f"required for a '{role}' message")
        return ""


class StreamOptions(BaseModel):
    include_usage: bool = False


MAX_N = 16  # choices per request

# OpenAI fields with no effect on the output, accepted and ignored as OpenAI-compatible servers do.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key",
                            "safety_identifier"})


def _unused(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {}


# Fields of OpenAI's (or vLLM's) API this server does not honour yet, each with the values that
# mean "not used"; any other value is refused naming the field rather than silently dropped.
NOT_HONOURED: dict[str, Any] = {
    "functions": _unused, "function_call": lambda v: v in (None, "none", "auto"),
    "prompt_logprobs": _unused,
    "echo": _unused, "best_of": lambda v: v in (None, 1), "suffix": _unused, "min_tokens": _unused,
    "reasoning_effort": _unused, "modalities": lambda v: v in (None, ["text"]),
    "audio": _unused, "prediction": _unused, "web_search_options": _unused,
}


def _vllm_structured(key: str, value: Any, param: str) -> StructuredOutput:
    """vLLM's structured_outputs / guided_* values as one StructuredOutput."""
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise RequestError(param, "is not valid JSON") from None
        if not isinstance(value, dict):
            raise RequestError(param, "must be a JSON schema object")
        return StructuredOutput("json_schema", json.dumps(value), param)
    if key == "json_object":
        return StructuredOutput("json_object", param=param)
    if key == "choice":  # the engine checks it is a non-empty list of strings
        return StructuredOutput("choice", json.dumps(value), param)
    if not isinstance(value, str) or not value:
        raise RequestError(param, "must be a non-empty string")
    return StructuredOutput(key, value, param)


class _Sampling(BaseModel):
    """Types only: the values are checked once, by Frontend.sampling, for both APIs; None is unset.
    Extra fields are kept so that `check_honoured` can name one the server would not apply."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as JSON writes keys) -> bias
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs, and vLLM's older guided_* fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured(self, thinking: bool) -> StructuredOutput | None:
        """The one output constraint the request asks for, by whichever field; two is an error.
        In thinking mode it applies after </think>."""
        found: list[StructuredOutput] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                found.append(StructuredOutput("json_object", param="response_format"))
            elif kind == "json_schema":
                schema = (rf.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise RequestError("response_format.json_schema.schema", "a JSON schema object is required")
                found.append(StructuredOutput("json_schema", json.dumps(schema), "response_format"))
            elif kind != "text":
                raise RequestError("response_format.type", f"{kind!r} is not 'text', 'json_object' or 'json_schema'")
        so = self.structured_outputs
        if so:
            keys = [k for k in ("json", "regex", "choice", "grammar", "json_object") if so.get(k) not in (None, False)]
            unknown = sorted(set(so) - {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace"})
            if unknown:
                raise RequestError(f"structured_outputs.{unknown[0]}", "is not supported")
            if len(keys) != 1:
                raise RequestError("structured_outputs", "give exactly one of json, regex, choice, grammar, json_object")
            found.append(_vllm_structured(keys[0], so[keys[0]], f"structured_outputs.{keys[0]}"))
        for key, value in (("json", self.guided_json), ("regex", self.guided_regex), ("choice", self.guided_choice),
                           ("grammar", self.guided_grammar)):
            if value is not None:
                found.append(_vllm_structured(key, value, f"guided_{key}"))
        if len(found) > 1:
            raise RequestError(found[1].param, f"only one output constraint per request (also {found[0].param})")
        return replace(found[0], after_think=thinking) if found else None

    def check_honoured(self) -> None:
        """A field this server would not apply is an error naming it, never silently dropped:
        OpenAI fields not built yet (unless at their "not used" value) and unknown fields;
        fields with no effect on the output (`user`, `metadata`, ...) pass."""
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED_FIELDS:
                continue
            if name in NOT_HONOURED:
                if NOT_HONOURED[name](value):
                    continue
                raise RequestError(name, f"{name}={value!r} is not supported by this server yet")
            raise RequestError(name, f"unknown field {name!r}")

    def sampling(self, frontend: Frontend, thinking: bool, max_tokens: int | None, logprobs: bool,
                 budget: int | None, top_logprobs: int = 0) -> SamplingParams:
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise RequestError("logit_bias", "keys must be token ids") from None
        return frontend.sampling(
            thinking, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logprobs=logprobs, thinking_budget=budget, top_logprobs=top_logprobs,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=bias, structured_output=self.structured(thinking),
        )


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = None
    max_think_tokens: int | None = None
    thinking_token_budget: int | None = None

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
    logprobs: int | None = Field(None, ge=0, le=20)  # the chosen token's logprob and this many alternatives
    echo: bool = False  # the prompt before the completion, with its logprobs when logprobs is set
    thinking_budget: int | None = None  # applies when the raw prompt leaves <think> open


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a raw prompt, or chat messages rendered by the template (with thinking
    decided as for a chat request)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = False
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


def routed_headers(routed: Routed) -> dict[str, str]:
    """Which pool served the request, and how many failed starts were retried before it."""
    headers = {"x-q3serve-pool": routed.pool}
    if routed.retries:
        headers["x-q3serve-retries"] = str(routed.retries)
    return headers


def error_event(exc: InstanceLost) -> str:
    """A stream that cannot go on ends with an error event in OpenAI's error shape (what the
    openai SDK raises as APIError), then [DONE]."""
    body = {"error": {"message": str(exc), "type": "service_unavailable", "param": None, "code": 503}}
    return "data: " + json.dumps(body) + "\n\ndata: [DONE]\n\n"


async def ending_in_error_event(events: AsyncIterator[str], event: Any) -> AsyncIterator[str]:
    """The events, then, if the pool failed mid-stream, `event(exc)` instead of a cut connection."""
    try:
        async for e in events:
            yield e
    except InstanceLost as exc:
        yield event(exc)


def error_response(exc: Exception) -> JSONResponse:
    """The Frontend's errors in OpenAI's shape."""
    if isinstance(exc, RequestError):
        return error(400, str(exc), exc.param)
    if isinstance(exc, ModelNotFound):
        return error(404, str(exc), "model", "not_found_error")
    if isinstance(exc, Unauthenticated):
        return error(401, str(exc), "authorization", "authentication_error")
    if isinstance(exc, Overloaded):
        return error(429, str(exc), kind="rate_limit_error")
    if isinstance(exc, PoolsUnavailable):
        return error(503, str(exc), kind="service_unavailable")
    raise exc


def build_openai_app(frontend: Frontend) -> FastAPI:
    """The HTTP app of one ingress replica, its routes closed over that replica's Frontend."""
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
        if request.url.path.startswith(("/v1/", "/tokenize", "/detokenize", "/admin/")):
            try:
                frontend.authorize(request.headers.get("authorization"))
            except Unauthenticated as exc:
                return error_response(exc)
            size = request.headers.get("content-length")
            limit = frontend.cfg.limits.max_request_bytes
            if size is not None and size.isdigit() and int(size) > limit:
                return error(413, f"body: {size} bytes exceed the limit of {limit}", "body")
        return await call_next(request)

    add_admin_routes(app, frontend)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = await frontend.router.ready()
        ok = bool(ready) and all(ready.values()) and not frontend.draining
        return JSONResponse({"pools": ready, "draining": frontend.draining}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": frontend.model_name, "object": "model", "created": frontend.created, "owned_by": "q3serve"}
        ]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Any:
        try:
            if body.model is not None:
                frontend.check_model(body.model)
            if (body.prompt is None) == (body.messages is None):
                raise RequestError("prompt", "give exactly one of prompt and messages")
            if body.messages is not None:
                explicit = body.enable_thinking
                if explicit is None and body.chat_template_kwargs and "enable_thinking" in body.chat_template_kwargs:
                    explicit = bool(body.chat_template_kwargs["enable_thinking"])
                _, ids = frontend.chat_prompt([m.model_dump(exclude_none=True) for m in body.messages], explicit)
            else:
                ids = frontend.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            return {"count": len(ids), "max_model_len": frontend.max_model_len, "tokens": ids,
                    "token_strs": frontend.tokenizer.convert_ids_to_tokens(ids)}
        except (RequestError, ModelNotFound) as exc:
            return error_response(exc)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Any:
        try:
            if body.model is not None:
                frontend.check_model(body.model)
            vocab = len(frontend.tokenizer)
            bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError("tokens", f"token id {bad} is outside the vocabulary [0, {vocab})")
            return {"prompt": frontend.tokenizer.decode(body.tokens)}
        except (RequestError, ModelNotFound) as exc:
            return error_response(exc)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        try:
            frontend.check_capacity("chat")
            frontend.check_model(body.model)
            body.check_honoured()
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            functions, forced, required = check_tools(body.tools, body.tool_choice)
            offered = [{"type": "function", "function": f} for f in functions]
            thinking, ids = frontend.chat_prompt(messages, body.explicit_thinking(), offered)
            if body.top_logprobs and not body.logprobs:
                raise RequestError("top_logprobs", "needs logprobs: true")
            params = body.sampling(frontend, thinking, body.max_completion_tokens or body.max_tokens, body.logprobs,
                                   body.budget(), body.top_logprobs or 0)
            params = constrain_to_tools(params, functions, forced, required, thinking, body.parallel_tool_calls)
            return await _serve(frontend, "chat", body, ids, params, thinking,
                                tools=ToolUse(bool(functions), body.parallel_tool_calls))
        except (RequestError, ModelNotFound, Overloaded, PoolsUnavailable) as exc:
            return error_response(exc)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        try:
            frontend.check_capacity("completions")
            frontend.check_model(body.model)
            body.check_honoured()
            ids = body.prompt if isinstance(body.prompt, list) else frontend.encode(body.prompt)
            thinking = body.thinking_budget is not None
            params = body.sampling(frontend, thinking, body.max_tokens, body.logprobs is not None, body.thinking_budget,
                                   body.logprobs or 0)
            if body.echo and body.logprobs is not None:
                params = replace(params, prompt_logprobs=body.logprobs)
            return await _serve(frontend, "completion", body, ids, params, thinking)
        except (RequestError, ModelNotFound, Overloaded, PoolsUnavailable) as exc:
            return error_response(exc)

    return app


@dataclass
class ToolUse:
    """Whether a chat request offered tools (its answers are parsed for calls) and may get several."""

    offered: bool = False
    parallel: bool = True


async def _serve(frontend: Frontend, kind: str, body: _Sampling, ids: list[int], params: SamplingParams,
                 thinking: bool, tools: ToolUse | None = None) -> Any:
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    route = "chat" if kind == "chat" else "completions"
    prompt_param = "messages" if kind == "chat" else "prompt"
    routed = await frontend.start(route, ids, params, thinking, prompt_param, rid)
    streams = [routed.chunks]
    if body.n > 1:
        streams = await _more_choices(frontend, route, ids, params, thinking, prompt_param, rid, body.n, routed.chunks)
    headers = routed_headers(routed)
    echo = None
    if getattr(body, "echo", False):
        prompt = body.prompt  # type: ignore[attr-defined]
        echo = Echo(prompt if isinstance(prompt, str) else frontend.tokenizer.decode(prompt), ids)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _sse(frontend, kind, rid, streams, thinking, include_usage, echo, tools or ToolUse())
        return StreamingResponse(ending_in_error_event(gen, error_event), media_type="text/event-stream", headers=headers)
    return JSONResponse(await _collect(frontend, kind, rid, streams, thinking, echo, tools or ToolUse()),
                        headers=headers)


@dataclass
class Echo:
    """/v1/completions with echo: the prompt as given, and its ids (whose logprobs come back)."""

    text: str
    ids: list[int]


async def _more_choices(frontend: Frontend, route: str, ids: list[int], params: SamplingParams, thinking: bool,
                        prompt_param: str, rid: str, n: int, first: AsyncIterator[PoolChunk]
                        ) -> list[AsyncIterator[PoolChunk]]:
    """`n` > 1: the other choices start once the first has its first chunk, so its prompt's
    full KV blocks are in the prefix cache and they compute only the rest (on the same replica;
    the router may put them on another, which then computes the prompt again). A seeded request's
    choice i uses seed + i, so the choices differ but the request reproduces. If a choice cannot
    start, the started ones are cancelled and the error is the request's."""
    head = await anext(first, None)
    streams: list[AsyncIterator[PoolChunk]] = [_prepend(head, first)]
    try:
        for i in range(1, n):
            p = replace(params, seed=None if params.seed is None else params.seed + i)
            streams.append((await frontend.start(route, ids, p, thinking, prompt_param, f"{rid}-{i}")).chunks)
    except BaseException:
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        raise
    return streams


async def _prepend(head: PoolChunk | None, rest: AsyncIterator[PoolChunk]) -> AsyncIterator[PoolChunk]:
    try:
        if head is not None:
            yield head
        async for c in rest:
            yield c
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def _merged(streams: list[AsyncIterator[PoolChunk]]) -> AsyncIterator[tuple[int, PoolChunk]]:
    """The choices' chunks as they come, tagged with their index; closing this (a client that
    went away) cancels every choice's request."""
    if len(streams) == 1:
        async for c in streams[0]:
            yield 0, c
        return
    queue: asyncio.Queue[tuple[int, PoolChunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[PoolChunk]) -> None:
        try:
            async for c in stream:
                await queue.put((i, c, None))
            await queue.put((i, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, c, exc = await queue.get()
            if exc is not None:
                raise exc
            if c is None:
                remaining -= 1
                continue
            yield i, c
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(frontend: Frontend, lasts: list[PoolChunk], thinking: bool) -> dict[str, Any]:
    """The prompt once, the completions (and their reasoning) of every choice summed."""
    us = [frontend.usage(last, thinking) for last in lasts]
    prompt, completion = us[0].prompt_tokens, sum(u.completion_tokens for u in us)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": sum(u.reasoning_tokens for u in us)}}


def _chat_logprobs(frontend: Frontend, ids: list[int], lps: list[float],
                   tops: list[list[tuple[int, float]]] | None) -> dict[str, Any]:
    """OpenAI's chat shape: per token its text, logprob, bytes and top alternatives."""
    def entry(t: int, lp: float) -> dict[str, Any]:
        text = frontend.tokenizer.decode([t])
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in (tops[i] if tops else [])]}
                        for i, (t, lp) in enumerate(zip(ids, lps))]}


def _completion_logprobs(frontend: Frontend, ids: list[int], lps: list[float | None],
                         tops: list[list[tuple[int, float]] | None] | None, offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists of tokens, their logprobs, a {token: logprob}
    map of alternatives per position (when asked), and each token's offset in the text. An
    echoed prompt's first token has None for both, as in OpenAI's API."""
    tokens = [frontend.tokenizer.decode([t]) for t in ids]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    top = [None if row is None else {frontend.tokenizer.decode([a]): alp for a, alp in row} for row in tops] if tops else None
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def _echoed(echo: Echo | None, c: PoolChunk, ids: list[int], lps: list[float | None],
            tops: list[list[tuple[int, float]] | None] | None) -> tuple[str, list[int], list[float | None], Any]:
    """The prompt's text, ids, logprobs and alternatives put before a choice's first chunk."""
    if echo is None:
        return "", ids, lps, tops
    if c.prompt_logprobs is None:  # echo without logprobs
        return echo.text, ids, lps, tops
    ptops = c.prompt_top_logprobs
    both_tops = ([*ptops, *(tops or [])] if ptops is not None else None)
    return echo.text, [*echo.ids, *ids], [*c.prompt_logprobs, *lps], both_tops


async def _collect(frontend: Frontend, kind: str, rid: str, streams: list[AsyncIterator[PoolChunk]],
                   thinking: bool, echo: Echo | None = None, tools: ToolUse = ToolUse()) -> dict[str, Any]:
    try:
        async with asyncio.TaskGroup() as group:  # one choice failing cancels the others
            tasks = [group.create_task(_choice(frontend, kind, i, c, thinking, echo, tools))
                     for i, c in enumerate(streams)]
    except BaseExceptionGroup as group_error:  # the request's error is the first choice's
        raise group_error.exceptions[0] from None
    choices, lasts = zip(*(t.result() for t in tasks))
    base = {"id": rid, "created": int(time.time()), "model": frontend.model_name,
            "usage": _usage(frontend, list(lasts), thinking), "q3serve_pool": lasts[0].pool}
    obj = "text_completion" if kind == "completion" else "chat.completion"
    return {**base, "object": obj, "choices": list(choices)}


async def _choice(frontend: Frontend, kind: str, index: int, chunks: AsyncIterator[PoolChunk], thinking: bool,
                  echo: Echo | None = None, tools: ToolUse = ToolUse()) -> tuple[dict[str, Any], PoolChunk]:
    """One choice, whole, and its last chunk (for usage)."""
    texts: list[str] = []
    lps: list[float | None] = []
    ids: list[int] = []
    tops: list[list[tuple[int, float]] | None] | None = None
    last = PoolChunk("none", [], "", [], 0, 0, 0)
    first = None
    async for c in chunks:
        first = first or c
        texts.append(c.delta_text)
        lps += c.delta_logprobs
        ids += c.delta_token_ids
        if c.delta_top_logprobs is not None:
            tops = (tops or []) + c.delta_top_logprobs
        last = c
    text = "".join(texts)
    if kind == "completion":
        asked = lps or (first is not None and first.prompt_logprobs is not None)
        if first is not None:
            prefix, ids, lps, tops = _echoed(echo, first, ids, lps, tops)
            text = prefix + text
        return {"index": index, "text": text, "finish_reason": last.finish_reason,
                "logprobs": _completion_logprobs(frontend, ids, lps, tops, 0) if asked else None}, last
    # With thinking off the template closed <think> in the prompt: all output is content.
    parsed = split_reasoning(text) if thinking else Parsed(None, text)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    finish = last.finish_reason
    if tools.offered:
        message["content"], calls = parse_tool_calls(parsed.content)
        if calls:
            message["tool_calls"] = calls if tools.parallel else calls[:1]
            finish = "tool_calls" if finish == "stop" else finish
    if parsed.reasoning is not None:
        message["reasoning_content"] = parsed.reasoning
    return {"index": index, "message": message, "finish_reason": finish,
            "logprobs": _chat_logprobs(frontend, ids, lps, tops) if lps else None}, last


async def _sse(frontend: Frontend, kind: str, rid: str, streams: list[AsyncIterator[PoolChunk]], thinking: bool,
               include_usage: bool, echo: Echo | None = None, tools: ToolUse = ToolUse()) -> AsyncIterator[str]:
    created = int(time.time())
    model = frontend.model_name
    n = len(streams)
    parsers = [StreamingReasoningParser() for _ in range(n)]
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    lasts: list[PoolChunk | None] = [None] * n
    offsets = [0] * n  # completions: where each choice's next chunk's text starts
    echoed = [False] * n
    tool_parsers = [StreamingToolParser() for _ in range(n)] if tools.offered else None

    def event(choice: dict[str, Any] | None, **extra: Any) -> str:
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                      "choices": [choice] if choice else [], **extra}) + "\n\n"

    if kind == "chat":
        for i in range(n):
            yield event({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    async for i, c in _merged(streams):
        lasts[i] = c
        done = c.finished
        finish = c.finish_reason if done else None
        if kind == "completion":
            text, ids, lps, tops = c.delta_text, c.delta_token_ids, list(c.delta_logprobs), c.delta_top_logprobs
            asked = bool(lps) or c.prompt_logprobs is not None
            if echo is not None and not echoed[i]:
                echoed[i] = True
                prefix, ids, lps, tops = _echoed(echo, c, ids, lps, tops)
                text = prefix + text
            if text or done or asked:
                lp = _completion_logprobs(frontend, ids, lps, tops, offsets[i]) if asked else None
                offsets[i] += len(text)
                yield event({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
            continue
        reasoning, content = parsers[i].feed(c.delta_text, final=done) if thinking else ("", c.delta_text)
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if tool_parsers is not None:
            content, calls = tool_parsers[i].feed(content, final=done)
            if not tools.parallel:
                calls = [d for d in calls if d["index"] == 0]
            if calls:
                delta["tool_calls"] = calls
            if done and tool_parsers[i].calls and finish == "stop":
                finish = "tool_calls"
        if content:
            delta["content"] = content
        if c.delta_logprobs:  # per token, with the chunk that carries it (the text may lag the ids)
            yield event({"index": i, "delta": delta, "finish_reason": finish,
                         "logprobs": _chat_logprobs(frontend, c.delta_token_ids, c.delta_logprobs, c.delta_top_logprobs)})
        elif delta or done:
            yield event({"index": i, "delta": delta, "finish_reason": finish})
    if include_usage and all(last is not None for last in lasts):
        yield event(None, usage=_usage(frontend, lasts, thinking))  # type: ignore[arg-type]
    yield "data: [DONE]\n\n"
