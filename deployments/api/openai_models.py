"""The request bodies of OpenAI's chat and completions APIs (and vLLM's extensions and
/tokenize, /detokenize) as pydantic models: types here, values checked by the front end."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from cluster.config import StructuredOutput
from deployments.api.http import IGNORED_FIELDS
from deployments.frontend import RequestError, SamplingFields


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


def explicit_thinking(enable_thinking: bool | None, chat_template_kwargs: dict[str, Any] | None) -> bool | None:
    """The client's switch: `enable_thinking`, else vLLM's `chat_template_kwargs.enable_thinking`."""
    if enable_thinking is not None:
        return enable_thinking
    value = (chat_template_kwargs or {}).get("enable_thinking")
    return None if value is None else bool(value)


class StreamOptions(BaseModel):
    include_usage: bool = False


MAX_N = 16  # choices per request


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


class SamplingRequest(BaseModel):
    """The fields chat and completions share. Types only: the values are checked once, by the
    front end, for every API; None is unset.
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

    def constraint(self) -> StructuredOutput | None:
        """The one output constraint the request asks for, by whichever field; two is an error."""
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
        return found[0] if found else None

    @property
    def include_usage(self) -> bool:
        """A stream's last event carries the usage (`stream_options.include_usage`)."""
        return bool(self.stream_options and self.stream_options.include_usage)

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

    def fields(self, max_tokens: int | None, logprobs: bool, budget: int | None, top_logprobs: int = 0,
               prompt_logprobs: int | None = None) -> SamplingFields:
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise RequestError("logit_bias", "keys must be token ids") from None
        return SamplingFields(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            logprobs=logprobs, top_logprobs=top_logprobs, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty, logit_bias=bias,
            thinking_budget=budget, prompt_logprobs=prompt_logprobs,
        )


class ChatRequest(SamplingRequest):
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
        return explicit_thinking(self.enable_thinking, self.chat_template_kwargs)


class CompletionRequest(SamplingRequest):
    # one prompt (text or token ids) or a batch of them, as OpenAI's API allows (lm-eval sends
    # batches of token-id lists); each prompt gets its own choices
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)  # the chosen token's logprob and this many alternatives
    echo: bool = False  # the prompt before the completion, with its logprobs when logprobs is set
    thinking_budget: int | None = None  # applies when the raw prompt leaves <think> open

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, (str, list)) and len(value) == 0:
            raise ValueError("must not be empty")
        if isinstance(value, list) and any(isinstance(p, (str, list)) and len(p) == 0 for p in value):
            raise ValueError("a prompt in the batch is empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The batch: a single prompt (text or ids) is a batch of one."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


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


    def explicit_thinking(self) -> bool | None:
        return explicit_thinking(self.enable_thinking, self.chat_template_kwargs)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


