"""Qwen3's thinking controls and reasoning parsing, on the request side of the cluster.

Mode: an explicit `enable_thinking` wins, else the latest `/think` or `/no_think` in a system or
user message, else the configured default. Parsing: the text between `<think>` and `</think>`
is `reasoning_content` (verbatim), the rest `content` (without the blank lines Qwen3 puts after
`</think>`); output cut inside the thinking part is all reasoning. Streaming and non-streaming
give the same strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_SWITCH = re.compile(r"/(no_think|think)\b")


def soft_switch(messages: Iterable[dict[str, Any]]) -> bool | None:
    """The latest /think or /no_think in a system or user message, if any."""
    found: bool | None = None
    for m in messages:
        if m.get("role") not in ("system", "user") or not isinstance(m.get("content"), str):
            continue
        for match in _SWITCH.finditer(m["content"]):
            found = match.group(1) == "think"
    return found


def decide_thinking(explicit: bool | None, messages: Iterable[dict[str, Any]], default: bool = True) -> bool:
    if explicit is not None:
        return explicit
    switch = soft_switch(messages)
    return default if switch is None else switch


@dataclass
class Parsed:
    reasoning: str | None
    content: str


def split_reasoning(text: str) -> Parsed:
    """Non-streaming split of a whole output."""
    stripped = text.lstrip()
    if not stripped.startswith(THINK_OPEN) and THINK_CLOSE not in text:
        return Parsed(None, text)
    body = stripped[len(THINK_OPEN):] if stripped.startswith(THINK_OPEN) else text
    if THINK_CLOSE not in body:
        return Parsed(body, "")
    reasoning, content = body.split(THINK_CLOSE, 1)
    return Parsed(reasoning, content.lstrip("\n"))


class StreamingReasoningParser:
    """Splits streamed text deltas into (reasoning, content) deltas. A tag split over two deltas
    is held back until it is complete."""

    def __init__(self) -> None:
        self.state = "start"  # start -> reasoning -> content, or start -> content
        self.buffer = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.buffer += delta
        reasoning, content = "", ""
        while self.buffer:
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buffer = stripped[len(THINK_OPEN):]
                    self.state = "reasoning"
                elif THINK_OPEN.startswith(stripped) and not final:
                    break  # could still become <think>
                else:
                    self.state = "content" if THINK_CLOSE not in self.buffer else "reasoning"
            elif self.state == "reasoning":
                idx = self.buffer.find(THINK_CLOSE)
                if idx >= 0:
                    reasoning += self.buffer[:idx]
                    self.buffer = self.buffer[idx + len(THINK_CLOSE):]
                    self.state = "after_think"
                    continue
                keep = partial_suffix(self.buffer, THINK_CLOSE) if not final else 0
                reasoning += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            elif self.state == "after_think":
                stripped = self.buffer.lstrip("\n")
                if not stripped and not final:
                    self.buffer = ""
                    break
                self.buffer = stripped
                self.state = "content"
            else:
                content += self.buffer
                self.buffer = ""
        return reasoning, content


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0

