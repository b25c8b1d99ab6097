"""Qwen3's thinking budget, enforced by the engine: after `thinking_budget` tokens inside
<think>, the stop-thinking text is appended and the model continues from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import LLM, SamplingParams
from cluster.engine.thinking import ThinkingBudget, ThinkingState
from cluster.engine.tokenizer import STOP_THINKING, THINK_END, THINK_START


@pytest.fixture(scope="module")
def llm(qwen_vocab_checkpoint: Path):
    # The shared checkpoint says max_position_embeddings=1024, but the KV pool here holds 64 x 8 = 512
    # tokens, so max_model_len is 512 as with this file's own checkpoint before (same seed, same weights).
    llm = LLM(qwen_vocab_checkpoint, dtype="float32", num_kv_blocks=64, block_size=8)
    yield llm
    llm.shutdown()


def _prompt(llm: LLM, open_think: bool) -> list[int]:
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n" + ("<think>\n" if open_think else "")
    return llm.tokenizer.encode(text, add_special_tokens=False)


def test_budget_forces_stop_text_then_continues(llm: LLM) -> None:
    stop_ids = llm.tokenizer.encode(STOP_THINKING, add_special_tokens=False)
    assert stop_ids[-2:] == [THINK_END, 271]  # "</think>" then "\n\n"
    prompt = _prompt(llm, open_think=True)
    free = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert THINK_END not in free.token_ids[:5]  # the random model does not close it by itself
    out = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, thinking_budget=5))[0]
    assert out.token_ids[:5] == free.token_ids[:5]
    assert out.token_ids[5:5 + len(stop_ids)] == stop_ids
    assert STOP_THINKING.strip() in out.text
    assert len(out.token_ids) == 40
    # The answer continues from the forced text exactly as if it had been in the prompt.
    rest = llm.generate(prompt + out.token_ids[:5 + len(stop_ids)], SamplingParams(max_tokens=40 - 5 - len(stop_ids), temperature=0, ignore_eos=True))[0]
    assert out.token_ids[5 + len(stop_ids):] == rest.token_ids


def test_budget_counts_from_a_generated_think() -> None:
    tb = ThinkingBudget(THINK_START, THINK_END, [7, 8, THINK_END])
    state = ThinkingState.from_prompt([1, 2, 3], THINK_START, THINK_END)
    assert not state.inside
    assert [tb.after_token(state, t, 3) for t in (11, 12)] == [[], []]  # not thinking yet
    assert tb.after_token(state, THINK_START, 3) == []
    assert [tb.after_token(state, t, 3) for t in (21, 22)] == [[], []]
    assert tb.after_token(state, 23, 3) == [7, 8, THINK_END]  # the third thinking token spends it
    assert state.done and tb.after_token(state, 24, 3) == []
    closed = ThinkingState.from_prompt([THINK_START, 5], THINK_START, THINK_END)
    assert closed.inside
    assert tb.after_token(closed, THINK_END, 1) == [] and closed.done  # closed by the model in time


def test_zero_budget_closes_open_think_at_once(llm: LLM) -> None:
    prompt = _prompt(llm, open_think=True)
    stop_ids = llm.tokenizer.encode(STOP_THINKING, add_special_tokens=False)
    out = llm.generate(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, thinking_budget=0))[0]
    assert out.prompt_token_ids == prompt + stop_ids
    assert STOP_THINKING.strip() not in out.text


def test_max_tokens_cuts_inside_forced_text(llm: LLM) -> None:
    prompt = _prompt(llm, open_think=True)
    stop_ids = llm.tokenizer.encode(STOP_THINKING, add_special_tokens=False)
    out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, thinking_budget=3))[0]
    assert len(out.token_ids) == 6 and out.token_ids[3:] == stop_ids[:3]
    assert out.finish_reason == "length"


def test_budget_needs_think_tokens(moe_checkpoint: Path) -> None:
    small = LLM(moe_checkpoint, dtype="float32", num_kv_blocks=16)
    with pytest.raises(ValueError, match="thinking_budget"):
        small.generate([[1, 2]], SamplingParams(thinking_budget=4))
    with pytest.raises(ValueError, match="thinking_budget"):
        SamplingParams(thinking_budget=-1)


def test_reasoning_tokens_are_counted_for_every_request(llm: LLM) -> None:
    """The engine tracks the <think> part of every request, budget or not: the count runs to the
    closing </think> (forced text included) and stops there."""
    stop_ids = llm.tokenizer.encode(STOP_THINKING, add_special_tokens=False)
    prompt = _prompt(llm, open_think=True)
    cut = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, thinking_budget=5))[0]
    assert cut.num_reasoning_tokens == 5 + stop_ids.index(THINK_END) + 1 < cut.num_output_tokens == 40
    free = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert free.num_reasoning_tokens == 12  # never closed: all of it is reasoning
    closed = _prompt(llm, open_think=False) + llm.tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert llm.generate(closed, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].num_reasoning_tokens == 0
