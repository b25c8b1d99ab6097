"""OpenAI's Responses API (`POST /v1/responses`, what the OpenAI SDK's `client.responses` and agent
SDKs call) over the same Frontend as chat: text or item input, `instructions`, function tools
(Qwen3's tool format underneath, tool_choice enforced as in chat), `text.format` structured
outputs, reasoning items for Qwen3's thinking part, and the streamed event sequence
(response.created ... response.completed). Nothing is stored: `store: true` and
`previous_response_id` are refused, so a client never believes a conversation was kept."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cluster.config import StructuredOutput
from deployments.api.http import GENERATE, IGNORED_FIELDS, error_response, event_stream, logprob_entries, routed_headers
from deployments.frontend import (REQUEST_ERRORS, Choice, Frontend, FrontRequest, Opened, RequestError, SamplingFields,
                                  Usage)
from deployments.frontend.answer_tokens import AnswerTokens

_TEXT_PARTS = ("input_text", "output_text", "text")
LOGPROBS = "message.output_text.logprobs"
INCLUDABLE = (LOGPROBS,)  # what `include` can ask for here; the rest is about OpenAI's hosted tools
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    enable_thinking: bool | None = None  # as in chat: Qwen3's switch, over `reasoning`
    include: list[str] | None = None  # extra output data: the answer's logprobs (the Agents SDK sends [])
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncation: str | None = None
    metadata: dict[str, str] | None = None

    def check_honoured(self) -> None:
        for name in self.model_extra or {}:
            if name not in IGNORED_FIELDS:
                raise RequestError(name, f"unknown field {name!r}")
        for i, value in enumerate(self.include or []):
            if value not in INCLUDABLE:
                raise RequestError(f"include.{i}", f"{value!r} cannot be included by this server; it offers {LOGPROBS!r}")
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs", f"needs include: [{LOGPROBS!r}]")
        if self.truncation not in (None, "disabled"):
            raise RequestError("truncation", "only 'disabled': this server never drops input; "
                                             "a prompt over the context length is refused")
        for key in (self.text or {}):
            if key != "format":
                raise RequestError(f"text.{key}", f"{key!r} is not supported; text takes 'format'")
        for key, value in (self.reasoning or {}).items():
            if key == "effort" and value not in REASONING_EFFORTS:
                raise RequestError("reasoning.effort", f"{value!r} is not one of {', '.join(REASONING_EFFORTS)}")
            if key not in ("effort", "summary") or (key == "summary" and value is not None):
                raise RequestError(f"reasoning.{key}", "not supported: the reasoning items carry Qwen3's thinking "
                                                       "text itself (reasoning.effort switches it on or off)")
        if self.store:
            raise RequestError("store", "this server stores no responses; send store: false")
        if self.previous_response_id is not None:
            raise RequestError("previous_response_id", "this server stores no responses; send the whole input")

    @property
    def logprobs(self) -> bool:
        return LOGPROBS in (self.include or [])

    def messages(self) -> list[dict[str, Any]]:
        """The input as chat messages for Qwen3's template."""
        out: list[dict[str, Any]] = []
        if self.instructions:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind == "message":
                role = {"developer": "system"}.get(item.get("role"), item.get("role"))
                if role not in ("system", "user", "assistant"):
                    raise RequestError(f"input.{i}.role", f"{item.get('role')!r} is not user, system, developer or assistant")
                out.append({"role": role, "content": _text(item.get("content"), f"input.{i}.content")})
            elif kind == "function_call":
                call = {"id": item.get("call_id"), "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
                if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                    out[-1]["tool_calls"].append(call)
                else:
                    out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                            "content": output if isinstance(output, str) else json.dumps(output)})
            elif kind != "reasoning":  # earlier reasoning: Qwen3's template drops it from history anyway
                raise RequestError(f"input.{i}.type", f"{kind!r} items are not supported")
        return out

    def chat_tools(self) -> tuple[list[dict[str, Any]] | None, Any]:
        """Responses' flat function tools and tool_choice in chat's shape."""
        tools = None
        if self.tools is not None:
            tools = []
            for i, t in enumerate(self.tools):
                if t.get("type") != "function":
                    raise RequestError(f"tools.{i}.type", f"{t.get('type')!r} tools are not supported; only 'function'")
                tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                               if k in t}})
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
            choice = {"type": "function", "function": {"name": choice["name"]}}
        return tools, choice

    def thinking_switch(self) -> bool | None:
        if self.enable_thinking is not None:
            return self.enable_thinking
        effort = (self.reasoning or {}).get("effort")
        return None if effort is None else effort not in ("none", "minimal")

    def constraint(self) -> StructuredOutput | None:
        fmt = (self.text or {}).get("format")
        if fmt is None or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_object":
            return StructuredOutput("json_object", param="text.format")
        if fmt.get("type") == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise RequestError("text.format.schema", "a JSON schema object is required")
            return StructuredOutput("json_schema", json.dumps(fmt["schema"]), "text.format")
        raise RequestError("text.format.type", f"{fmt.get('type')!r} is not 'text', 'json_object' or 'json_schema'")


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(param, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            raise RequestError(f"{param}.{j}.type", f"{part.get('type') if isinstance(part, dict) else part!r} "
                                                    "parts are not supported; this model reads text")
        texts.append(part.get("text") or "")
    return "\n".join(texts)


def responses_request(body: ResponsesRequest) -> FrontRequest:
    body.check_honoured()
    tools, choice = body.chat_tools()
    fields = SamplingFields(max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p,
                            logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0)
    return FrontRequest("responses", "input", messages=body.messages(), tools=tools, tool_choice=choice,
                        parallel_tool_calls=body.parallel_tool_calls, thinking=body.thinking_switch(), sampling=fields,
                        constraint=body.constraint())


def add_responses_routes(app: FastAPI, frontend: Frontend) -> None:
    @app.post("/v1/responses", responses=GENERATE)
    async def responses(body: ResponsesRequest) -> Any:
        try:
            with frontend.refusals("responses"):
                frontend.admit(body.model)
                opened = await frontend.open(responses_request(body), "resp_")
            state = _State(opened.id, body, frontend.model_name,
                           AnswerTokens(frontend.tokenizer, opened.thinking) if body.logprobs else None)
            if body.stream:
                return event_stream(opened, _events(state, opened), _error_event)
            (choice,) = await opened.whole()
        except REQUEST_ERRORS as exc:
            return error_response(exc)
        state.finish_whole(choice)
        return JSONResponse(state.response(), headers=routed_headers(opened))


@dataclass
class _State:
    """One response being built: its output items and usage."""

    id: str
    body: ResponsesRequest
    model: str
    answer: AnswerTokens | None = None  # with include logprobs: picks the answer's tokens
    created: int = field(default_factory=lambda: int(time.time()))
    items: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None

    def finish_whole(self, c: Choice) -> None:
        """Items from a whole answer: reasoning, the message, the function calls."""
        self.usage = c.usage if c.outputs else None
        self.finish_reason = c.finish_reason
        if c.reasoning is not None:
            self.items.append(_reasoning_item(c.reasoning))
        if c.content or not c.tool_calls:
            self.items.append(_message_item(c.content or ""))
            if self.answer is not None:
                self.items[-1]["content"][0]["logprobs"] = self.logprobs(c.token_ids, c.logprobs, c.top_logprobs)
        for call in c.tool_calls:
            self.items.append(_call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))

    def logprobs(self, ids: list[int], lps: list[float | None],
                 tops: list[list[tuple[int, float]] | None] | None) -> list[dict[str, Any]]:
        """The logprob objects of the answer's tokens among these (the state follows the stream)."""
        assert self.answer is not None
        mask = self.answer.feed(ids)
        keep = [i for i, m in enumerate(mask) if m]
        return logprob_entries(self.answer.tokenizer, [ids[i] for i in keep], [lps[i] for i in keep],
                               [tops[i] for i in keep] if tops else None)

    def response(self, status: str | None = None) -> dict[str, Any]:
        incomplete = self.finish_reason == "length"
        usage = None
        if self.usage is not None:
            u = self.usage
            usage = {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
                     "output_tokens": u.completion_tokens,
                     "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens}, "total_tokens": u.total_tokens}
        b = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model,
            "status": status or ("incomplete" if incomplete else "completed"),
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete and status is None else None,
            "error": None, "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
            "temperature": b.temperature, "top_p": b.top_p, "tools": b.tools or [], "tool_choice": b.tool_choice or "auto",
            "parallel_tool_calls": b.parallel_tool_calls, "reasoning": b.reasoning, "text": b.text or {"format": {"type": "text"}},
            "store": False, "metadata": b.metadata or {}, "truncation": "disabled", "top_logprobs": b.top_logprobs,
            "output": self.items, "usage": usage,
        }


def _reasoning_item(text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _error_event(exc: Exception) -> str:
    """The Responses stream's `error` event, for a pool that failed mid-stream (retriable)."""
    body = {"type": "error", "code": "service_unavailable", "message": str(exc), "param": None}
    return "event: error\ndata: " + json.dumps(body) + "\n\n"


class _EventStream:
    """The Responses stream's events for one response: each item added, its deltas, done."""

    def __init__(self, state: _State) -> None:
        self.state = state
        self.seq = 0
        self.open_item: dict[str, Any] | None = None  # the reasoning or message item being streamed
        self.calls: dict[int, dict[str, Any]] = {}    # function-call items by their call index

    def event(self, kind: str, **data: Any) -> str:
        self.seq += 1
        return f"event: {kind}\ndata: " + json.dumps({"type": kind, "sequence_number": self.seq, **data}) + "\n\n"

    def close(self) -> list[str]:
        """Ends the open reasoning or message item."""
        if self.open_item is None:
            return []
        item, self.open_item = self.open_item, None
        index = self.state.items.index(item)
        item["status"] = "completed"
        part = item["content"][0]
        if item["type"] == "reasoning":
            out = [self.event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=part["text"])]
        else:
            logprobs = {"logprobs": part["logprobs"]} if "logprobs" in part else {}
            out = [self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=part["text"], **logprobs),
                   self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                              part=part)]
        return [*out, self.event("response.output_item.done", output_index=index, item=item)]

    def open_new(self, item: dict[str, Any]) -> list[str]:
        out = self.close()
        self.state.items.append(item)
        self.open_item = item
        index = len(self.state.items) - 1
        out.append(self.event("response.output_item.added", output_index=index, item={**item, "status": "in_progress"}))
        if item["type"] == "message":
            out.append(self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": []}))
        return out

    def text(self, kind: str, delta: str, logprobs: list[dict[str, Any]] | None = None) -> list[str]:
        """A reasoning or message text delta, into the open item of that kind (opened if need be);
        a message delta carries the logprobs of its tokens when they were asked for."""
        out = []
        if self.open_item is None or self.open_item["type"] != kind:
            out = self.open_new(_reasoning_item("") if kind == "reasoning" else _message_item("", "in_progress"))
        item = self.open_item
        part = item["content"][0]  # type: ignore[index]
        part["text"] += delta
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra: dict[str, Any] = {}
        if logprobs is not None and kind == "message":
            part["logprobs"] = part.get("logprobs", []) + logprobs
            extra["logprobs"] = logprobs
        return [*out, self.event(name, item_id=item["id"], output_index=len(self.state.items) - 1,  # type: ignore[index]
                                 content_index=0, delta=delta, **extra)]

    def call(self, d: dict[str, Any]) -> list[str]:
        """A tool-call delta: a new function_call item (id and name), or its whole arguments."""
        if "id" in d:
            out = self.close()
            item = _call_item(d["id"], d["function"]["name"], "", "in_progress")
            self.state.items.append(item)
            self.calls[d["index"]] = item
            return [*out, self.event("response.output_item.added", output_index=len(self.state.items) - 1, item=item)]
        if d["index"] not in self.calls:
            return []
        item = self.calls[d["index"]]
        index = self.state.items.index(item)
        item["arguments"] += d["function"]["arguments"]
        item["status"] = "completed"
        return [self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                           delta=d["function"]["arguments"]),
                self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                           arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=index, item=item)]


async def _events(state: _State, opened: Opened) -> AsyncIterator[str]:
    """The Responses stream: created, in_progress, each item added / its deltas / done, completed."""
    stream = _EventStream(state)
    pending: list[dict[str, Any]] = []  # answer logprobs not yet sent with a message delta
    yield stream.event("response.created", response=state.response("in_progress"))
    yield stream.event("response.in_progress", response=state.response("in_progress"))
    async for d in opened.deltas():
        state.usage, state.finish_reason = d.usage, d.finish_reason
        out: list[str] = []
        if state.answer is not None:  # the text may lag the ids: logprobs wait for the next message delta
            pending += state.logprobs(d.token_ids, d.logprobs, d.top_logprobs)
        if d.reasoning:
            out += stream.text("reasoning", d.reasoning)
        opened_message = stream.open_item is not None and stream.open_item["type"] == "message"
        if d.content.strip() or (d.content and opened_message):
            out += stream.text("message", d.content, pending if state.answer is not None else None)
            pending = []
        for call in d.tool_calls:
            out += stream.call(call)
        for e in out:
            yield e
    message = stream.open_item if stream.open_item is not None and stream.open_item["type"] == "message" else None
    if message is not None and state.answer is not None:
        part = message["content"][0]
        part["logprobs"] = part.get("logprobs", []) + pending  # the done events carry all of them
    for e in stream.close():
        yield e
    if not state.items:
        state.items.append(_message_item(""))
    final = state.response()
    yield stream.event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)
