"""OpenAI's (legacy) completions (`POST /v1/completions`): a raw prompt (text or token ids), its
choices rendered as one text_completion or as streamed ones, with `echo` (the prompt first, and
its logprobs when `logprobs` is set) and the legacy logprobs shape."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI

from deployments.api.http import GENERATE, error_response, event_stream, usage_object, whole_response
from deployments.api.openai_models import CompletionRequest
from deployments.frontend import REQUEST_ERRORS, Choice, Frontend, FrontRequest, Opened, RequestError, Usage
from deployments.frontend.fanout import close_all

TopRows = list[list[tuple[int, float]] | None] | None


def completion_request(body: CompletionRequest, prompt: str | list[int]) -> FrontRequest:
    asked = body.logprobs is not None
    fields = body.fields(body.max_tokens, asked, body.thinking_budget, body.logprobs or 0,
                         prompt_logprobs=body.logprobs if body.echo and asked else None)
    return FrontRequest("completions", "prompt", prompt=prompt, sampling=fields, constraint=body.constraint(),
                        n=body.n)


@dataclass
class Echo:
    """/v1/completions with echo: the prompt as given, and its ids (whose logprobs come back)."""

    text: str
    ids: list[int]


def add_completions_route(app: FastAPI, frontend: Frontend) -> None:
    @app.post("/v1/completions", responses=GENERATE)
    async def completions(body: CompletionRequest) -> Any:
        try:
            with frontend.refusals("completions"):
                frontend.admit(body.model)
                body.check_honoured()
                prompts = body.prompts()
                limit = frontend.cfg.limits.max_batch_prompts
                if len(prompts) > limit:
                    raise RequestError("prompt", f"a batch of {len(prompts)} prompts is over this server's limit of {limit}")
                batch = await open_batch(frontend, body, prompts)
            echo = None
            if body.echo:
                echo = [Echo(p if isinstance(p, str) else frontend.tokenizer.decode(p), ids)
                        for p, ids in zip(prompts, batch.prompt_ids_of) for _ in range(body.n)]
            if body.stream:
                return event_stream(batch.opened, completion_events(frontend, batch, body.include_usage, echo))
            choices = await batch.opened.whole()
        except REQUEST_ERRORS as exc:
            return error_response(exc)
        return whole_response(batch.opened, frontend.model_name, "text_completion", choices,
                              [_choice(frontend, c, echo[c.index] if echo else None) for c in choices],
                              usage=batch.usage([c.usage for c in choices]))


@dataclass
class Batch:
    """A batch of prompts started as one request: `opened` holds every prompt's choices in order
    (choice index = prompt x n + choice, as OpenAI and vLLM number them)."""

    opened: Opened
    n: int
    prompt_ids_of: list[list[int]]

    def usage(self, choices: list[Usage]) -> Usage:
        """Each prompt once, every choice's completion: the prompts' usages summed."""
        groups = [Usage.total(choices[i:i + self.n]) for i in range(0, len(choices), self.n)]
        return Usage(sum(u.prompt_tokens for u in groups), sum(u.completion_tokens for u in groups),
                     sum(u.reasoning_tokens for u in groups), sum(u.cached_tokens for u in groups))


async def open_batch(frontend: Frontend, body: CompletionRequest, prompts: list[str | list[int]]) -> Batch:
    """Starts each prompt's choices, in order; if one cannot start, the started ones are cancelled
    and its error (naming `prompt`) is the request's."""
    opened: list[Opened] = []
    try:
        for prompt in prompts:
            opened.append(await frontend.open(completion_request(body, prompt), "cmpl-"))
    except BaseException:
        await close_all([s for o in opened for s in o.streams])
        raise
    one = opened[0]
    if len(opened) > 1:
        one = replace(one, retries=sum(o.retries for o in opened), streams=[s for o in opened for s in o.streams])
    return Batch(one, body.n, [o.prompt_ids for o in opened])


def completion_logprobs(frontend: Frontend, ids: list[int], lps: list[float | None], tops: TopRows,
                        offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists of tokens, their logprobs, a {token: logprob}
    map of alternatives per position (when asked), and each token's offset in the text. An
    echoed prompt's first token has None for both, as in OpenAI's API. A position's map holds
    the token itself too when it is not among the k likeliest (an echoed prompt's token, a
    sampled one): OpenAI's "up to logprobs+1 elements", as vLLM does."""
    tokens = [frontend.tokenizer.decode([t]) for t in ids]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    top = [_alternatives(frontend, row, tok, lp) for row, tok, lp in zip(tops, tokens, lps)] if tops else None
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def _alternatives(frontend: Frontend, row: list[tuple[int, float]] | None, token: str,
                  logprob: float | None) -> dict[str, float] | None:
    """One position's {token: logprob} map: the k likeliest, then the token itself if absent."""
    if row is None:
        return None
    out = {frontend.tokenizer.decode([a]): alp for a, alp in row}
    if logprob is not None:
        out.setdefault(token, logprob)
    return out


def _echoed(echo: Echo | None, prompt_logprobs: list[float | None] | None, prompt_tops: TopRows, ids: list[int],
            lps: list[float | None], tops: TopRows) -> tuple[str, list[int], list[float | None], TopRows]:
    """The prompt's text, ids, logprobs and alternatives put before a choice's first tokens."""
    if echo is None:
        return "", ids, lps, tops
    if prompt_logprobs is None:  # echo without logprobs
        return echo.text, ids, lps, tops
    both_tops = [*prompt_tops, *(tops or [])] if prompt_tops is not None else None
    return echo.text, [*echo.ids, *ids], [*prompt_logprobs, *lps], both_tops


def _choice(frontend: Frontend, c: Choice, echo: Echo | None) -> dict[str, Any]:
    ids, lps, tops, text = c.token_ids, c.logprobs, c.top_logprobs, c.text
    asked = bool(lps) or (c.outputs > 0 and c.prompt_logprobs is not None)
    if c.outputs:
        prefix, ids, lps, tops = _echoed(echo, c.prompt_logprobs, c.prompt_top_logprobs, ids, lps, tops)
        text = prefix + text
    return {"index": c.index, "text": text, "finish_reason": c.finish_reason,
            "logprobs": completion_logprobs(frontend, ids, lps, tops, 0) if asked else None}


async def completion_events(frontend: Frontend, batch: Batch, include_usage: bool, echo: list[Echo] | None
                            ) -> AsyncIterator[str]:
    opened = batch.opened
    created = int(time.time())
    n = len(opened.streams)
    usages: list[Usage | None] = [None] * n
    offsets = [0] * n  # where each choice's next text starts
    echoed = [False] * n

    def event(choice: dict[str, Any] | None, **extra: Any) -> str:
        return "data: " + json.dumps({"id": opened.id, "object": "text_completion", "created": created,
                                      "model": frontend.model_name, "choices": [choice] if choice else [], **extra}) + "\n\n"

    async for d in opened.deltas():
        i = d.index
        usages[i] = d.usage
        text, ids, lps, tops = d.content, d.token_ids, list(d.logprobs), d.top_logprobs
        asked = bool(lps) or d.prompt_logprobs is not None
        if echo is not None and not echoed[i]:
            echoed[i] = True
            prefix, ids, lps, tops = _echoed(echo[i], d.prompt_logprobs, d.prompt_top_logprobs, ids, lps, tops)
            text = prefix + text
        if text or d.finished or asked:
            lp = completion_logprobs(frontend, ids, lps, tops, offsets[i]) if asked else None
            offsets[i] += len(text)
            yield event({"index": i, "text": text, "logprobs": lp, "finish_reason": d.finish_reason})
    if include_usage and all(u is not None for u in usages):
        yield event(None, usage=usage_object(batch.usage(usages)))  # type: ignore[arg-type]
    yield "data: [DONE]\n\n"
