"""Qwen3's thinking part, tracked for every request. A sequence is inside it from a `<think>`
(in the prompt's open assistant turn or generated) until `</think>`. The tracker counts the
output tokens of the thinking part (what the API reports as reasoning tokens) and enforces the
budget: once `thinking_budget` tokens are spent inside without `</think>`, the engine appends
Qwen's stop-thinking text, which ends with `</think>\\n\\n`, and the model goes on to answer
(Qwen3 technical report, thinking budget)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ThinkingState:
    inside: bool = False        # between <think> and </think>
    spent: int = 0              # tokens generated inside (what the budget counts)
    done: bool = False          # closed, or its stop text is being forced: no budget applies
    reasoning_tokens: int = 0   # output tokens of the thinking part, its tags included

    @classmethod
    def from_prompt(cls, prompt: list[int], start: int, end: int) -> "ThinkingState":
        """Inside when the prompt's last <think> is not closed after it."""
        last_start, last_end = _last(prompt, start), _last(prompt, end)
        return cls(inside=last_start > last_end)


def prompt_closes_thinking(prompt: list[int], start: int, end: int) -> bool:
    """Whether the prompt closed a thinking part (non-thinking mode, or a budget of 0)."""
    return _last(prompt, end) > _last(prompt, start)


def _last(prompt: list[int], token: int) -> int:
    return max((i for i, t in enumerate(prompt) if t == token), default=-1)


class ThinkingBudget:
    """Updates a request's ThinkingState with each output token and says which tokens to force."""

    def __init__(self, think_start: int, think_end: int, stop_ids: list[int]) -> None:
        self.start = think_start
        self.end = think_end
        self.stop_ids = stop_ids

    def after_token(self, state: ThinkingState, token: int, budget: int | None) -> list[int]:
        """Takes one output token (generated, or forced by an earlier call); returns the tokens to
        append now: Qwen's stop text when this token spends the budget, else none."""
        if state.inside:
            state.reasoning_tokens += 1
            if token == self.end:
                state.inside, state.done = False, True
                return []
            if state.done:  # the forced stop text, on its way to </think>
                return []
            state.spent += 1
            return self._maybe_stop(state, budget)
        if token == self.start and not state.done:
            state.inside = True
            state.reasoning_tokens += 1
            return self._maybe_stop(state, budget)
        return []

    def _maybe_stop(self, state: ThinkingState, budget: int | None) -> list[int]:
        if budget is not None and state.spent >= budget:
            state.done = True
            return list(self.stop_ids)
        return []
