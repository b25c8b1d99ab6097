"""Qwen3 tool-call blocks -> OpenAI tool_calls: whole answers and streams split anywhere give the
same calls and text; malformed blocks stay text; bad tools / tool_choice name their field."""

from __future__ import annotations

import json

import pytest

from cluster import RequestError
from deployments.frontend.tool_calls import StreamingToolParser, ToolUse, check_tools, parse_tool_calls

ANSWER = ('Let me compute.\n<tool_call>\n{"name": "mul", "arguments": {"a": 6, "b": 7}}\n</tool_call>\n'
          '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')


def test_whole_answer() -> None:
    text, calls = parse_tool_calls(ANSWER)
    assert text == "Let me compute."
    assert [c["function"]["name"] for c in calls] == ["mul", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 6, "b": 7}
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert parse_tool_calls("plain") == ("plain", [])
    broken = "<tool_call>\nnot json\n</tool_call>"
    assert parse_tool_calls(broken) == (broken, [])
    assert parse_tool_calls(ANSWER.split("\n", 1)[1])[0] is None  # only calls: content is null


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_stream_split_anywhere_gives_the_same(step: int) -> None:
    parser = StreamingToolParser()
    text, deltas = "", []
    pieces = [ANSWER[i : i + step] for i in range(0, len(ANSWER), step)]
    for k, piece in enumerate(pieces):
        t, d = parser.feed(piece, final=k == len(pieces) - 1)
        text += t
        deltas += d
    names = {d["index"]: d["function"]["name"] for d in deltas if "id" in d}
    args: dict[int, str] = {}
    for d in deltas:
        args[d["index"]] = args.get(d["index"], "") + d["function"]["arguments"]
    _, calls = parse_tool_calls(ANSWER)
    assert [names[i] for i in sorted(names)] == [c["function"]["name"] for c in calls]
    assert [json.loads(args[i]) for i in sorted(args)] == [json.loads(c["function"]["arguments"]) for c in calls]
    assert text.strip() == "Let me compute."
    first = next(d for d in deltas if d["index"] == 0)
    assert first["function"]["arguments"] == "" and first["function"]["name"] == "mul"  # name first, then arguments


def test_unclosed_block_at_the_end_is_text() -> None:
    parser = StreamingToolParser()
    t1, _ = parser.feed("hi <tool_call>\n{\"name\"")
    t2, calls = parser.feed("", final=True)
    assert t1 + t2 == "hi <tool_call>\n{\"name\"" and calls == []


FN = {"type": "function", "function": {"name": "mul", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ([{"type": "retrieval"}], None, "tools.0.type"),
    ([{"type": "function", "function": {}}], None, "tools.0.function.name"),
    ([FN], {"type": "function", "function": {"name": "add"}}, "tool_choice.function.name"),
    (None, "required", "tool_choice"),
    ([FN], "sometimes", "tool_choice"),
])
def test_bad_tools_name_the_field(tools, choice, param) -> None:  # noqa: ANN001
    with pytest.raises(RequestError) as exc:
        check_tools(tools, choice)
    assert exc.value.param == param


def test_tool_choice_modes() -> None:
    assert check_tools([FN], "none") == ToolUse((), None, False)
    assert check_tools([FN], None) == ToolUse((FN["function"],), None, False)
    assert check_tools([FN], "required") == ToolUse((FN["function"],), None, True)
    assert check_tools([FN], {"type": "function", "function": {"name": "mul"}}) == ToolUse((FN["function"],), "mul", True)
