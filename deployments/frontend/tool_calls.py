"""Tool calling in Qwen3's own format, on the request side: the offered `tools` go into Qwen3's
chat template (its `# Tools` system section), the model answers with `<tool_call>\\n{"name": ...,
"arguments": {...}}\\n</tool_call>` blocks, and those become OpenAI `tool_calls` (streamed as
OpenAI streams them: id and name first, then the arguments). `tool_choice` "required" or a named
function is enforced by constrained decoding (a grammar over the blocks, cluster/engine/structured.py),
"auto" leaves the choice to the model, "none" does not offer the tools."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from cluster import RequestError
from cluster.config import StructuredOutput
from deployments.frontend.thinking import partial_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers, as `check_tools` validated them: the functions (empty when
    none are offered, and answers are then not parsed for calls), the one a named choice forces,
    whether a call is required, and whether several calls may come."""

    functions: tuple[dict[str, Any], ...] = ()
    forced: str | None = None
    required: bool = False
    parallel: bool = True

    @property
    def offered(self) -> bool:
        return bool(self.functions)

    def for_template(self) -> list[dict[str, Any]]:
        """The functions in the shape Qwen3's chat template reads."""
        return [{"type": "function", "function": f} for f in self.functions]

    def constraint(self, other: StructuredOutput | None, thinking: bool) -> StructuredOutput | None:
        """The output constraint: a required call's grammar (one or more blocks, one unless
        `parallel`, a named function exactly once, as in vLLM), else `other`. A request whose
        output is constrained otherwise as well is refused."""
        if not self.required:
            return other
        if other is not None:
            raise RequestError("tool_choice", f"a required tool call and {other.param} cannot both constrain the output")
        spec = {"tools": [{"name": f["name"], "parameters": f.get("parameters")} for f in self.functions],
                "choice": self.forced, "parallel": self.parallel and self.forced is None}
        return StructuredOutput("tool_call", json.dumps(spec), "tool_choice", thinking)


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool = True) -> ToolUse:
    """Validates `tools` and `tool_choice` (chat's shapes); errors name the field."""
    functions = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RequestError(f"tools.{i}.type", "only 'function' tools are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"tools.{i}.function.name", "a function needs a name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError(f"tools.{i}.function.parameters", "must be a JSON schema object")
        functions.append(fn)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolUse(parallel=parallel)
    if choice in ("auto", "required"):
        if choice == "required" and not functions:
            raise RequestError("tool_choice", "'required' needs tools")
        return ToolUse(tuple(functions), None, choice == "required", parallel)
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in {f["name"] for f in functions}:
            raise RequestError("tool_choice.function.name", f"{name!r} is not one of the tools")
        return ToolUse(tuple(functions), name, True, parallel)
    raise RequestError("tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")


def _call(body: str) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer -> (the text outside the blocks, or None when there is none; the calls).
    A block that is not a JSON call stays in the text."""
    calls: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        call = _call(match.group(1))
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    rest = _BLOCK.sub(take, text)
    if not calls:
        return text, []
    rest = rest.strip()
    return (rest or None), calls


class StreamingToolParser:
    """Content deltas -> (text delta, tool-call deltas). Text before a block streams as it comes;
    a block is held until it closes, then goes out as OpenAI streams a call: a delta with its
    index, id, type and name (arguments ""), then one with the arguments."""

    def __init__(self) -> None:
        self.buffer = ""
        self.calls = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += delta
        text, out = "", []
        while self.buffer:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = 0 if final else partial_suffix(self.buffer, OPEN)
                text += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            end = self.buffer.find(CLOSE, start)
            if end < 0:
                text += self.buffer[:start]
                self.buffer = self.buffer[start:]
                if final:  # an unclosed block: it was text after all
                    text += self.buffer
                    self.buffer = ""
                break
            text += self.buffer[:start]
            call = _call(self.buffer[start + len(OPEN) : end].strip())
            if call is None:
                text += self.buffer[: end + len(CLOSE)][start:]
            else:
                fn = call["function"]
                out.append({"index": self.calls, "id": call["id"], "type": "function",
                            "function": {"name": fn["name"], "arguments": ""}})
                out.append({"index": self.calls, "function": {"arguments": fn["arguments"]}})
                self.calls += 1
            self.buffer = self.buffer[end + len(CLOSE) :]
            if self.calls:
                self.buffer = self.buffer.lstrip("\n")
        return text, out
