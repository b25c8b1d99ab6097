"""Which generated tokens are the answer's text: what Responses' `message.output_text.logprobs`
covers. The reasoning split works on text (thinking.py); logprobs come per token, so this follows
the token ids the same way: a thinking request's output that opens with `<think>` is reasoning up
to `</think>`, one that does not is all answer; the answer stops at the first `<tool_call>`; special
tokens and the blank lines before the answer are not its text."""

from __future__ import annotations

from typing import Any

from cluster import THINK_END, THINK_START
from deployments.frontend.tool_calls import OPEN as TOOL_CALL_OPEN


class AnswerTokens:
    """Fed a choice's token ids in order (delta by delta), says which of them are answer text."""

    def __init__(self, tokenizer: Any, thinking: bool) -> None:
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.tool_open = tokenizer.convert_tokens_to_ids(TOOL_CALL_OPEN)
        # "start": a thinking request's first non-blank token decides; "reasoning"; "answer"; "tools"
        self.state = "start" if thinking else "answer"
        self.started = False  # a non-blank answer token was seen

    def feed(self, ids: list[int]) -> list[bool]:
        mask = []
        for t in ids:
            # only the tokens before the answer's first word need their text (a blank line or not)
            blank = not self.started and self.state in ("start", "answer") and not self.tokenizer.decode([t]).strip()
            if self.state == "start" and not blank:
                self.state = "reasoning" if t == THINK_START else "answer"
            elif self.state == "reasoning" and t == THINK_END:
                self.state = "answer"
                mask.append(False)
                continue
            if self.state == "answer" and t == self.tool_open:
                self.state = "tools"
            keep = self.state == "answer" and t not in self.special and (self.started or not blank)
            self.started = self.started or keep
            mask.append(keep)
        return mask
