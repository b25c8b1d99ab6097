"""Structured outputs: a request's constraint (JSON schema, any JSON object, regex, choice, EBNF
grammar, or Qwen3 tool calls) compiled by xgrammar, the grammar engine vLLM and SGLang use, and a
per-request matcher that the engine advances with every output token.

As in vLLM V1 the grammar state lives with the scheduler, not the model: before each step the
engine fills each constrained row's allowed-token bitmask (32 tokens per int32) and the plan
carries it; the runner applies all rows' masks to the logits in one batched op (logits.py). With
`after_think` the matcher starts only after the model's `</think>`, so reasoning stays free."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import torch

from cluster.config import RequestError, StructuredOutput

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class GrammarCompiler:
    """One per engine: xgrammar's tokenizer view of the vocabulary and its compile cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.words = -(-vocab_size // 32)
        self._lock = threading.Lock()  # requests are made on callers' threads

    def compile(self, so: StructuredOutput) -> Any:
        """The compiled grammar; a spec xgrammar cannot compile is a RequestError naming `so.param`."""
        c = self.compiler
        try:
            with self._lock:
                if so.kind == "json_schema":
                    return c.compile_json_schema(so.spec, any_whitespace=False)
                if so.kind == "json_object":
                    return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
                if so.kind == "regex":
                    return c.compile_regex(so.spec)
                if so.kind == "choice":
                    options = json.loads(so.spec)
                    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
                        raise ValueError("choice must be a non-empty list of strings")
                    return c.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in options))
                if so.kind == "grammar":
                    return c.compile_grammar(so.spec)
                if so.kind == "tool_call":
                    return c.compile_grammar(tool_call_grammar(json.loads(so.spec)))
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar's errors: the request's spec is at fault
            raise RequestError(so.param, f"cannot be compiled: {str(exc).splitlines()[0][:300]}") from None
        raise RequestError(so.param, f"unknown kind {so.kind!r}")

    def constraint(self, so: StructuredOutput, state: str) -> "Constraint":
        return Constraint(self._xgr.GrammarMatcher(self.compile(so)), self.words, state)


class Constraint:
    """One request's matcher and where the request stands: "active" (every output token obeys
    the grammar), "waiting" (inside the reasoning: free until `</think>`), or "pending" (a
    thinking-mode answer whose first token may open the reasoning with `<think>` or start the
    answer, which then obeys the grammar from that token on)."""

    def __init__(self, matcher: Any, words: int, state: str) -> None:
        self.matcher = matcher
        self.words = words
        self.state = state

    def bitmask(self, also: int | None = None) -> torch.Tensor:
        """[words] int32: bit t of word t // 32 set = token t allowed next (`also` allowed too)."""
        import xgrammar as xgr

        mask = xgr.allocate_token_bitmask(1, self.words * 32)
        self.matcher.fill_next_token_bitmask(mask, 0)
        if also is not None:
            mask[0, also // 32] |= torch.tensor(1 << (also % 32), dtype=torch.int64).to(torch.int32)
        return mask[0]

    def accept(self, token: int) -> bool:
        """Advances by an output token; False when the grammar refuses it."""
        return bool(self.matcher.accept_token(token))

    @property
    def done(self) -> bool:
        return bool(self.matcher.is_terminated())


def tool_call_grammar(spec: dict[str, Any]) -> str:
    """EBNF for Qwen3's tool calls: one or more `<tool_call>\n{"name": ..., "arguments": ...}\n
    </tool_call>` blocks (the JSON as Qwen3's template writes it), the name one of the offered
    functions (or the one `choice` names) and the arguments valid against its parameter schema."""
    import xgrammar as xgr

    tools = spec["tools"]
    if spec.get("choice"):
        tools = [t for t in tools if t["name"] == spec["choice"]]
    calls = [{"type": "object", "properties": {"name": {"const": t["name"]},
                                               "arguments": t.get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    body = re.sub(r"\broot\b", "call", str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)))
    blocks = 'block ("\\n" block)*' if spec.get("parallel", True) else "block"
    return (f'root ::= {blocks}\nblock ::= "{TOOL_CALL_OPEN}\\n" call "\\n{TOOL_CALL_CLOSE}"\n' + body)
