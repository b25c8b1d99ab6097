"""What the front end hands the protocol adapters: typed deltas of a streamed choice (reasoning
text, content text, tool-call deltas, logprobs, finish, usage) or a whole choice. The reasoning
split and the tool-call parsing happen here once, for every protocol; streamed and whole
answers give the same strings (deployments/frontend/thinking.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cluster import RequestOutput
from deployments.frontend.thinking import StreamingReasoningParser, split_reasoning
from deployments.frontend.tool_calls import StreamingToolParser, ToolUse, parse_tool_calls

TopLogprobs = list[list[tuple[int, float]]]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of(cls, out: RequestOutput, thinking: bool) -> "Usage":
        """With thinking off the template closed <think> in the prompt, so nothing is reasoning."""
        return cls(out.num_prompt_tokens, out.num_output_tokens, out.num_reasoning_tokens if thinking else 0,
                   out.num_cached_tokens)

    @classmethod
    def total(cls, choices: list["Usage"]) -> "Usage":
        """The prompt once (as the first choice computed it), the completions (and their
        reasoning) of every choice summed."""
        return cls(choices[0].prompt_tokens, sum(u.completion_tokens for u in choices),
                   sum(u.reasoning_tokens for u in choices), choices[0].cached_tokens)


@dataclass
class Delta:
    """What one choice got since its last delta; the last has `finished` and the finish reason
    ("tool_calls" where the answer made calls and stopped)."""

    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # as OpenAI streams them: id and name, then arguments
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: TopLogprobs | None = None
    prompt_logprobs: list[float | None] | None = None  # when asked for: on the first delta (and the last)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    finished: bool = False
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)  # running counts of this choice


@dataclass
class Choice:
    """A whole choice: the raw text, and for a chat request its reasoning, content and calls."""

    index: int
    text: str = ""
    reasoning: str | None = None
    content: str | None = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_logprobs: list[float | None] | None = None  # from the first output, when asked for
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    outputs: int = 0  # how many outputs the pool sent (0: none)


class ChoiceParser:
    """One streamed choice's outputs -> Deltas: the reasoning split (thinking requests) and the
    tool-call parser (requests that offered tools); a raw prompt's text passes as content."""

    def __init__(self, index: int, thinking: bool, raw: bool, tools: ToolUse) -> None:
        self.index = index
        self.thinking = thinking
        self.reasoning = StreamingReasoningParser() if thinking and not raw else None
        self.tools = StreamingToolParser() if tools.offered and not raw else None
        self.parallel = tools.parallel

    def feed(self, out: RequestOutput) -> Delta:
        done = out.finished
        reasoning, content = self.reasoning.feed(out.delta_text, final=done) if self.reasoning else ("", out.delta_text)
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content, final=done)
            if not self.parallel:
                calls = [d for d in calls if d["index"] == 0]
        finish = out.finish_reason if done else None
        if done and self.tools is not None and self.tools.calls and finish == "stop":
            finish = "tool_calls"
        return Delta(self.index, reasoning, content, calls, out.delta_token_ids, list(out.delta_logprobs or []),
                     out.delta_top_logprobs, out.prompt_logprobs, out.prompt_top_logprobs, done, finish,
                     Usage.of(out, self.thinking))


async def collect_choice(index: int, outputs: AsyncIterator[RequestOutput], thinking: bool, raw: bool,
                         tools: ToolUse) -> Choice:
    """One choice, whole: its outputs joined, then split and parsed as a whole answer."""
    c = Choice(index)
    texts: list[str] = []
    last: RequestOutput | None = None
    async for out in outputs:
        if last is None:
            c.prompt_logprobs, c.prompt_top_logprobs = out.prompt_logprobs, out.prompt_top_logprobs
        texts.append(out.delta_text)
        c.logprobs += out.delta_logprobs or []
        c.token_ids += out.delta_token_ids
        if out.delta_top_logprobs is not None:
            c.top_logprobs = (c.top_logprobs or []) + out.delta_top_logprobs
        c.outputs += 1
        last = out
    c.text = "".join(texts)
    if last is not None:
        c.finish_reason, c.usage = last.finish_reason, Usage.of(last, thinking)
    if raw:
        return c
    # With thinking off the template closed <think> in the prompt: all output is content.
    if thinking:
        parsed = split_reasoning(c.text)
        c.reasoning, c.content = parsed.reasoning, parsed.content
    else:
        c.content = c.text
    if tools.offered:
        c.content, calls = parse_tool_calls(c.content or "")
        if calls:
            c.tool_calls = calls if tools.parallel else calls[:1]
            c.finish_reason = "tool_calls" if c.finish_reason == "stop" else c.finish_reason
    return c
