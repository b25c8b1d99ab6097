"""Incremental detokenization with stop strings.

Text is emitted only once it is stable: a token that ends in the middle of a UTF-8 character
decodes to U+FFFD and waits for the next one, and with stop strings the last few characters are
held back until they cannot start a stop string. Only the text not yet emitted is kept as one
string (the emitted text is kept as pieces), so each token costs the same however long the
output already is.
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
        self.emitted: list[str] = []  # text handed out so far, in pieces
        self.pending = ""             # decoded, not yet handed out (held back for stop strings)
        self.stopped: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far (joined on demand: for final outputs)."""
        return "".join(self.emitted)

    def decode(self, ids: list[int]) -> str:
        if self._decode is not None:
            return self._decode.decode(ids, skip_special_tokens=self.skip_special)
        return self._tok.decode(ids, skip_special_tokens=self.skip_special)

    def step(self, token: int, finished: bool) -> str:
        """Adds one token; returns the text delta that is now safe to emit. Sets `stopped`
        to the stop string when one appears (the text is then cut there)."""
        self.ids.append(token)
        window = self.ids[self.prefix_offset:]
        prefix = self.decode(window[: self.read_offset - self.prefix_offset])
        full = self.decode(window)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            search_from = max(0, len(self.pending) - self.hold)
            self.pending += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            # the window only ever needs the ids from prefix_offset on
            del self.ids[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
            if self.stop:
                self._check_stop(search_from)
        elif finished and full.endswith("\ufffd"):
            self.pending += full[len(prefix):]  # the output ends mid-character: flush what there is
        if self.stopped is not None or finished or not self.stop:
            cut = len(self.pending)
        else:
            cut = max(0, len(self.pending) - self.hold)
        delta, self.pending = self.pending[:cut], self.pending[cut:]
        if delta:
            self.emitted.append(delta)
        return delta

    def _check_stop(self, start: int) -> None:
        hits = [(self.pending.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            pos, s = min(hits)
            self.stopped = s
            self.pending = self.pending[: pos + len(s)] if self.include_stop else self.pending[:pos]
