"""OpenAI's chat completions (`POST /v1/chat/completions`): a ChatRequest translated into the
front end's request, its choices rendered as one chat.completion or as chat.completion.chunk
events (reasoning in `reasoning_content`, as vLLM and SGLang send Qwen3's)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from deployments.api.http import GENERATE, error_response, event_stream, logprob_entries, usage_object, whole_response
from deployments.api.openai_models import ChatRequest
from deployments.frontend import REQUEST_ERRORS, Choice, Frontend, FrontRequest, Opened, RequestError, Usage


def chat_request(body: ChatRequest) -> FrontRequest:
    body.check_honoured()
    if body.top_logprobs and not body.logprobs:
        raise RequestError("top_logprobs", "needs logprobs: true")
    fields = body.fields(body.max_completion_tokens or body.max_tokens, body.logprobs, body.budget(),
                         body.top_logprobs or 0)
    return FrontRequest("chat", "messages", messages=[m.model_dump(exclude_none=True) for m in body.messages],
                        tools=body.tools, tool_choice=body.tool_choice, parallel_tool_calls=body.parallel_tool_calls,
                        thinking=body.explicit_thinking(), sampling=fields, constraint=body.constraint(), n=body.n)


def add_chat_route(app: FastAPI, frontend: Frontend) -> None:
    @app.post("/v1/chat/completions", responses=GENERATE)
    async def chat(body: ChatRequest) -> Any:
        try:
            with frontend.refusals("chat"):
                frontend.admit(body.model)
                opened = await frontend.open(chat_request(body), "chatcmpl-")
            if body.stream:
                return event_stream(opened, chat_events(frontend, opened, body.include_usage))
            choices = await opened.whole()
        except REQUEST_ERRORS as exc:
            return error_response(exc)
        return whole_response(opened, frontend.model_name, "chat.completion", choices,
                              [_choice(frontend, c) for c in choices])


def chat_logprobs(frontend: Frontend, ids: list[int], lps: list[float],
                  tops: list[list[tuple[int, float]]] | None) -> dict[str, Any]:
    """OpenAI's chat shape: per token its text, logprob, bytes and top alternatives."""
    return {"content": logprob_entries(frontend.tokenizer, ids, lps, tops)}  # type: ignore[arg-type]


def _choice(frontend: Frontend, c: Choice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.content}
    if c.tool_calls:
        message["tool_calls"] = c.tool_calls
    if c.reasoning is not None:
        message["reasoning_content"] = c.reasoning
    return {"index": c.index, "message": message, "finish_reason": c.finish_reason,
            "logprobs": chat_logprobs(frontend, c.token_ids, c.logprobs, c.top_logprobs) if c.logprobs else None}  # type: ignore[arg-type]


async def chat_events(frontend: Frontend, opened: Opened, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    n = len(opened.streams)
    usages: list[Usage | None] = [None] * n

    def event(choice: dict[str, Any] | None, **extra: Any) -> str:
        return "data: " + json.dumps({"id": opened.id, "object": "chat.completion.chunk", "created": created,
                                      "model": frontend.model_name, "choices": [choice] if choice else [], **extra}) + "\n\n"

    for i in range(n):
        yield event({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    async for d in opened.deltas():
        usages[d.index] = d.usage
        delta: dict[str, Any] = {}
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.tool_calls:
            delta["tool_calls"] = d.tool_calls
        if d.content:
            delta["content"] = d.content
        if d.logprobs:  # per token, with the delta that carries it (the text may lag the ids)
            yield event({"index": d.index, "delta": delta, "finish_reason": d.finish_reason,
                         "logprobs": chat_logprobs(frontend, d.token_ids, d.logprobs, d.top_logprobs)})
        elif delta or d.finished:
            yield event({"index": d.index, "delta": delta, "finish_reason": d.finish_reason})
    if include_usage and all(u is not None for u in usages):
        yield event(None, usage=usage_object(Usage.total(usages)))  # type: ignore[arg-type]
    yield "data: [DONE]\n\n"
