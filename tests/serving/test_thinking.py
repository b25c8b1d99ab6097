"""Thinking control end to end with a model that always thinks (see `thinker_checkpoint`): the
budget's stop-thinking text lands in reasoning_content and the answer in content, streaming or
not; output cut inside the thinking part is all reasoning."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.helpers.serving import ServeApp

STOP_MARK = "Considering the limited time by the user"


@pytest.fixture(scope="module")
def client(serve_app: ServeApp, thinker_checkpoint: Path) -> openai.OpenAI:
    # no time bound on the thinking pool's chunks and no stream count below which they go out a token
    # at a time, so their sizes follow stream_interval alone
    base = serve_app(model=thinker_checkpoint, thinking={"max_thinking_budget": 16, "stream_max_delay_ms": None,
                                                         "stream_interval_min_streams": 0})
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)


def _stream(client: openai.OpenAI, **kw) -> tuple[str, str, str | None]:
    reasoning, content, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return reasoning, content, finish


def test_budget_stop_text_in_reasoning_then_answer(client: openai.OpenAI) -> None:
    kw = dict(model="m", messages=[{"role": "user", "content": "Think about it"}], max_tokens=40, temperature=0,
              extra_body={"thinking_budget": 3})
    resp = client.chat.completions.create(**kw)
    msg = resp.choices[0].message
    assert STOP_MARK in msg.reasoning_content and msg.reasoning_content.count("<think>") == 3
    assert STOP_MARK not in msg.content and msg.content  # the model went on after </think>
    reasoning_tokens = resp.usage.completion_tokens_details.reasoning_tokens
    assert 4 + 1 < reasoning_tokens < resp.usage.completion_tokens  # <think>, 3 spent, then the stop text
    assert _stream(client, **kw) == (msg.reasoning_content, msg.content, resp.choices[0].finish_reason)


def test_responses_logprobs_leave_the_thinking_out(client: openai.OpenAI) -> None:
    """Responses' include message.output_text.logprobs covers the answer after </think>: none of the
    reasoning item's tokens (nor the stop text), one entry per answer token, as chat counts them."""
    kw = dict(model="m", input="Think about it", max_output_tokens=80, temperature=0, top_logprobs=1,
              include=["message.output_text.logprobs"])
    r = client.responses.create(**kw)
    (reasoning,) = [item for item in r.output if item.type == "reasoning"]
    (message,) = [item for item in r.output if item.type == "message"]
    lps = message.content[0].logprobs
    assert STOP_MARK in reasoning.content[0].text and r.output_text
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Think about it"}],
                                          max_tokens=80, temperature=0, logprobs=True)
    every = chat.choices[0].logprobs.content
    answer = len(every) - chat.usage.completion_tokens_details.reasoning_tokens - 1  # less </think>
    assert 0 < len(lps) <= answer < len(every)
    assert [(lp.token, round(lp.logprob, 4)) for lp in lps] == [(c.token, round(c.logprob, 4)) for c in every[-len(lps):]]
    assert "".join(lp.token for lp in lps).strip() == r.output_text.strip()
    streamed = [lp.token for e in client.responses.create(**kw, stream=True)
                if e.type == "response.output_text.delta" for lp in (e.logprobs or [])]
    assert streamed == [lp.token for lp in lps]


def test_budget_capped_by_pool(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=60,
                                          temperature=0, extra_body={"thinking_budget": 1000})
    assert resp.choices[0].message.reasoning_content.count("<think>") == 16  # the pool's max_thinking_budget


def test_cut_inside_thinking_is_all_reasoning(client: openai.OpenAI) -> None:
    kw = dict(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=0)
    resp = client.chat.completions.create(**kw)
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "length"
    assert msg.reasoning_content == "<think>" * 4 and not msg.content
    assert resp.usage.completion_tokens_details.reasoning_tokens == 5
    assert _stream(client, **kw) == (msg.reasoning_content, "", "length")


def test_thinking_off_has_no_reasoning(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "x /no_think"}], max_tokens=5, temperature=0)
    assert raw.headers["x-q3serve-pool"] == "fast"
    resp = raw.parse()
    # The template closed thinking in the prompt: whatever the model writes is content.
    assert not getattr(resp.choices[0].message, "reasoning_content", None)
    assert resp.usage.completion_tokens_details.reasoning_tokens == 0


def test_thinking_pool_streams_in_chunks_of_its_interval(client: openai.OpenAI) -> None:
    """The thinking preset's stream_interval of 16 reaches the stream (its 100 ms bound and its
    32-stream threshold are off in this module; tests/unit/test_engine_async.py covers both): 40 tokens (the budget's
    16 thoughts, the stop text, the answer) come in a handful of chunks, not one per token, and
    say the same as the whole response."""
    kw = dict(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=40, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    deltas = [(getattr(ch.delta, "reasoning_content", None) or "", ch.delta.content or "")
              for chunk in client.chat.completions.create(stream=True, **kw) for ch in chunk.choices]
    deltas = [d for d in deltas if d[0] or d[1]]
    assert whole.usage.completion_tokens == 40
    # 1 + 16 + 16 + 7 tokens, split where reasoning turns into content; fewer when the engine ran
    # ahead of the stream and coalesced (12 chunks were seen with the interval not passed on)
    assert 1 <= len(deltas) <= 6, deltas
    assert "".join(r for r, _ in deltas) == whole.choices[0].message.reasoning_content
    assert "".join(c for _, c in deltas) == whole.choices[0].message.content
