"""Qwen3's thinking budget. A sequence is inside its thinking part from a `<think>` (in the
prompt's open assistant turn or generated) until `</think>`. Once `thinking_budget` tokens are
spent inside without `</think>`, the engine appends Qwen's stop-thinking text, which ends with
`</think>\\n\\n`, and the model goes on to answer (Qwen3 technical report, thinking budget)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ThinkingState:
    inside: bool = False
    spent: int = 0
    done: bool = False

    @classmethod
    def from_prompt(cls, prompt: list[int], start: int, end: int) -> "ThinkingState":
        """Inside when the prompt's last <think> is not closed after it."""
        last_start = max((i for i, t in enumerate(prompt) if t == start), default=-1)
        last_end = max((i for i, t in enumerate(prompt) if t == end), default=-1)
        return cls(inside=last_start > last_end)


class ThinkingBudget:
    """Tracks thinking per sequence and says which tokens to force."""

    def __init__(self, think_start: int, think_end: int, stop_ids: list[int]) -> None:
        self.start = think_start
        self.end = think_end
        self.stop_ids = stop_ids

    def after_token(self, state: ThinkingState, token: int, budget: int | None) -> list[int]:
        """Updates the state with a generated token; returns the tokens to append now."""
        if state.done:
            return []
        if not state.inside:
            if token == self.start:
                state.inside = True
                return self._maybe_stop(state, budget)
            return []
        if token == self.end:
            state.inside, state.done = False, True
            return []
        state.spent += 1
        return self._maybe_stop(state, budget)

    def _maybe_stop(self, state: ThinkingState, budget: int | None) -> list[int]:
        if budget is not None and state.spent >= budget:
            state.inside, state.done = False, True
            return list(self.stop_ids)
        return []
