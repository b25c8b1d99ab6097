"""What the HTTP adapters share of OpenAI's wire conventions: the error shape
{"error": {"message", "type", "param", "code"}}, the headers that say which pool served a
request, a stream's error ending, the usage object, and the fields accepted and ignored."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from deployments.frontend import (Choice, InstanceLost, ModelNotFound, Opened, Overloaded, PoolsUnavailable,
                                  RequestError, Unauthenticated, Usage)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error shape, what every 4xx and 5xx of this API carries."""

    error: ErrorBody


_MEANING = {400: "A field is invalid; `error.param` names it.", 401: "Missing or wrong API key.",
            404: "No such model (or pool).", 413: "The body is over limits.max_request_bytes.",
            429: "Every pool is at capacity; retry later.", 503: "No pool can serve now; retry later.",
            504: "The pool did not answer in time."}


def documented(*codes: int, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for the OpenAPI schema: its error codes in OpenAI's shape and, for a
    route that streams, the server-sent events its 200 can be (the schema says what is served)."""
    out: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": _MEANING[code]}
                                            for code in codes}
    if stream:
        out[200] = {"description": "JSON, or with `stream: true` server-sent events",
                    "content": {"application/json": {}, "text/event-stream": {}}}
    return out


# Every route that takes a body or a model: a bad field, a key, the size guard, an unknown model.
REQUEST_CODES = (400, 401, 404, 413)
GENERATE = documented(*REQUEST_CODES, 429, 503, stream=True)


def logprob_entries(tokenizer: Any, ids: list[int], lps: list[float | None],
                    tops: list[list[tuple[int, float]] | None] | None) -> list[dict[str, Any]]:
    """OpenAI's per-token logprob objects (chat's `logprobs.content`, Responses' output_text
    `logprobs`): the token's text, logprob, bytes and its top alternatives."""
    def entry(t: int, lp: float | None) -> dict[str, Any]:
        text = tokenizer.decode([t])
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in ((tops[i] or []) if tops else [])]}
            for i, (t, lp) in enumerate(zip(ids, lps))]


# OpenAI fields with no effect on the output, accepted and ignored as OpenAI-compatible servers do.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key",
                            "safety_identifier"})


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


def error_response(exc: Exception) -> JSONResponse:
    """The front end's errors in OpenAI's shape."""
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


def routed_headers(opened: Opened) -> dict[str, str]:
    """Which pool served the request, and how many failed starts were retried before it."""
    headers = {"x-q3serve-pool": opened.pool}
    if opened.retries:
        headers["x-q3serve-retries"] = str(opened.retries)
    return headers


def error_event(exc: InstanceLost) -> str:
    """A stream that cannot go on ends with an error event in OpenAI's error shape (what the
    openai SDK raises as APIError), then [DONE]."""
    body = {"error": {"message": str(exc), "type": "service_unavailable", "param": None, "code": 503}}
    return "data: " + json.dumps(body) + "\n\ndata: [DONE]\n\n"


async def ending_in_error_event(events: AsyncIterator[str], event: Callable[[InstanceLost], str] = error_event
                                ) -> AsyncIterator[str]:
    """The events, then, if the pool failed mid-stream, `event(exc)` instead of a cut connection."""
    try:
        async for e in events:
            yield e
    except InstanceLost as exc:
        yield event(exc)


def usage_object(u: Usage) -> dict[str, Any]:
    """Chat's and completions' usage; `cached_tokens` are the prompt's tokens served from the
    prefix cache, as OpenAI and vLLM report them."""
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def event_stream(opened: Opened, events: AsyncIterator[str],
                 on_loss: Callable[[InstanceLost], str] = error_event) -> StreamingResponse:
    """Server-sent events that end in `on_loss`'s error event if the pool fails mid-stream."""
    return StreamingResponse(ending_in_error_event(events, on_loss), media_type="text/event-stream",
                             headers=routed_headers(opened))


def whole_response(opened: Opened, model: str, kind: str, choices: list[Choice], rendered: list[dict[str, Any]],
                   usage: Usage | None = None) -> JSONResponse:
    """A chat.completion or text_completion: the rendered choices and the usage of all of them
    (one prompt's unless `usage` says otherwise)."""
    return JSONResponse({
        "id": opened.id, "created": int(time.time()), "model": model,
        "usage": usage_object(usage or Usage.total([c.usage for c in choices])), "q3serve_pool": opened.pool,
        "object": kind, "choices": rendered,
    }, headers=routed_headers(opened))
