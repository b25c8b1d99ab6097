"""Thinking-mode decision and reasoning parsing (streaming equals non-streaming)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.frontend.thinking import StreamingReasoningParser, decide_thinking, soft_switch, split_reasoning

CASES = {
    "<think>\nplan: add\n</think>\n\nThe answer is 4.": ("\nplan: add\n", "The answer is 4."),
    "<think>\ncut off mid-thought": ("\ncut off mid-thought", ""),
    "No thinking here.": (None, "No thinking here."),
    "<think>\n\n</think>\n\nfast": ("\n\n", "fast"),
    "": (None, ""),
}


def test_soft_switch_latest_wins() -> None:
    msgs = [{"role": "system", "content": "be brief /no_think"}, {"role": "user", "content": "hi"}]
    assert soft_switch(msgs) is False
    msgs.append({"role": "assistant", "content": "/think"})  # assistant messages do not switch
    assert soft_switch(msgs) is False
    msgs.append({"role": "user", "content": "now reason /think please"})
    assert soft_switch(msgs) is True
    assert soft_switch([{"role": "user", "content": "a /thinking b"}]) is None


def test_decide_thinking_order() -> None:
    msgs = [{"role": "user", "content": "x /no_think"}]
    assert decide_thinking(True, msgs) is True
    assert decide_thinking(None, msgs) is False
    assert decide_thinking(None, [{"role": "user", "content": "x"}]) is True
    assert decide_thinking(None, [{"role": "user", "content": "x"}], default=False) is False


def test_split_reasoning() -> None:
    for text, (reasoning, content) in CASES.items():
        parsed = split_reasoning(text)
        assert (parsed.reasoning, parsed.content) == (reasoning, content), text


def _stream(pieces: list[str]) -> tuple[str, str]:
    p = StreamingReasoningParser()
    r, c = "", ""
    for i, piece in enumerate(pieces):
        dr, dc = p.feed(piece, final=i == len(pieces) - 1)
        r, c = r + dr, c + dc
    return r, c


@settings(max_examples=300, deadline=None)
@given(text=st.sampled_from(list(CASES)), cuts=st.lists(st.integers(0, 60), max_size=8))
def test_streaming_matches_whole(text: str, cuts: list[int]) -> None:
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
    reasoning, content = _stream(pieces)
    parsed = split_reasoning(text)
    assert reasoning == (parsed.reasoning or "") and content == parsed.content
