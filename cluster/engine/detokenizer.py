"""Incremental detokenization with stop strings.

Text is emitted only once it is stable: a token that ends in the middle of a UTF-8 character
decodes to U+FFFD and waits for the next one, and with stop strings the last few characters are
held back until they cannot start a stop string.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from cluster.config import SamplingParams


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], params: SamplingParams) -> None:
        self._decode = getattr(tokenizer, "backend_tokenizer", None)
        self._tok = tokenizer
        self.skip_special = params.skip_special_tokens
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids = list(prompt_ids[-6:])  # a little context so leading spaces decode correctly
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0
        self.stopped: str | None = None

    def decode(self, ids: list[int]) -> str:
        if self._decode is not None:
            return self._decode.decode(ids, skip_special_tokens=self.skip_special)
        return self._tok.decode(ids, skip_special_tokens=self.skip_special)

    def step(self, token: int, finished: bool) -> str:
        """Adds one token; returns the text delta that is now safe to emit. Sets `stopped`
        to the stop string when one appears (the text is then cut there)."""
        self.ids.append(token)
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            search_from = max(0, len(self.text) - self.hold)
            self.text += new
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.stop:
                self._check_stop(search_from)
        elif finished and full.endswith("\ufffd"):
            self.text += full[len(prefix):]  # the output ends mid-character: flush what there is
        if self.stopped is not None or finished:
            end = len(self.text)
        else:
            end = max(self.emitted, len(self.text) - self.hold) if self.stop else len(self.text)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    def _check_stop(self, start: int) -> None:
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            pos, s = min(hits)
            self.stopped = s
            self.text = self.text[: pos + len(s)] if self.include_stop else self.text[:pos]
