"""Structured outputs through the engine (xgrammar's matcher in the engine, the bitmask applied
to the logits in the runner): every output parses and obeys its constraint, greedy and sampled,
batched beside unconstrained rows; in thinking mode the reasoning is free and the constraint
starts after </think>; a spec that cannot compile names its field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from cluster import LLM, SamplingParams
from cluster.config import RequestError, StructuredOutput
THINK_END = "</think>"

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "color": {"enum": ["red", "green"]}},
          "required": ["ok", "n", "color"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(qwen_vocab_checkpoint: Path):
    engine = LLM(qwen_vocab_checkpoint, dtype="float32", num_kv_blocks=256)
    yield engine
    engine.shutdown()


def test_constraints_hold_greedy_and_sampled_in_one_batch(llm: LLM) -> None:
    ids = llm.tokenizer.encode("Answer:", add_special_tokens=False)
    cases = [
        (StructuredOutput("json_schema", json.dumps(SCHEMA)), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        (StructuredOutput("regex", r"[0-9]{3}-(yes|no)"), lambda t: re.fullmatch(r"[0-9]{3}-(yes|no)", t) or 1 / 0),
        (StructuredOutput("choice", json.dumps(["red", "green", "blue"])), lambda t: t in ("red", "green", "blue") or 1 / 0),
        (StructuredOutput("grammar", 'root ::= "(" [a-c] [a-c]? ")"'), lambda t: re.fullmatch(r"\([a-c]{1,2}\)", t) or 1 / 0),
    ]
    params, checks = [], []
    for so, check in cases:
        for temperature in (0.0, 1.0):
            params.append(SamplingParams(max_tokens=40, temperature=temperature, seed=5, structured_output=so))
            checks.append(check)
    params.append(SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # an unconstrained row beside them
    outs = llm.generate([ids] * len(params), params)
    for out, check, p in zip(outs, checks, params):
        assert out.finish_reason == "stop", (p.structured_output, out.text)
        check(out.text)
    (alone,) = llm.generate([ids], params[-1])
    assert outs[-1].token_ids == alone.token_ids, "the masks touch only their own rows"


def test_constraint_starts_after_think(llm: LLM) -> None:
    """Thinking mode: the model thinks freely (here, until a budget of 4 forces </think>), then
    the answer obeys the regex."""
    ids = llm.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n",
                               add_special_tokens=False)
    so = StructuredOutput("regex", "(yes|no)", after_think=True)
    (out,) = llm.generate([ids], SamplingParams(max_tokens=60, temperature=0, thinking_budget=4, structured_output=so))
    assert THINK_END in out.text
    answer = out.text.split(THINK_END, 1)[1].lstrip("\n")  # the forced stop text ends "</think>\n\n"
    assert answer in ("yes", "no"), out.text
    assert out.text.split(THINK_END, 1)[0].strip(), "the reasoning was not constrained away"


@pytest.mark.parametrize("so", [StructuredOutput("json_schema", "{not json", param="response_format"),
                                StructuredOutput("regex", "(unclosed", param="structured_outputs"),
                                StructuredOutput("choice", "[]", param="structured_outputs"),
                                StructuredOutput("grammar", "root ::= nothing_defined", param="structured_outputs")])
def test_specs_that_do_not_compile_name_the_field(llm: LLM, so: StructuredOutput) -> None:
    with pytest.raises(RequestError) as exc:
        llm.generate([[1, 2]], SamplingParams(structured_output=so))
    assert exc.value.param == so.param and "cannot be compiled" in str(exc.value)


def test_a_thinking_answer_may_open_reasoning_or_start_the_answer(llm: LLM) -> None:
    """Thinking mode with the reasoning not yet opened (Qwen3's template leaves `<think>` to the
    model): the first token may be `<think>` or the answer's; the answer obeys either way."""
    from cluster.engine.structured import GrammarCompiler

    ids = llm.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    so = StructuredOutput("regex", "(yes|no)", after_think=True)
    for temperature in (0.0, 1.0):
        (out,) = llm.generate([ids], SamplingParams(max_tokens=30, temperature=temperature, seed=2, thinking_budget=4,
                                                    structured_output=so))
        answer = out.text.split(THINK_END, 1)[1].lstrip("\n") if THINK_END in out.text else out.text
        assert answer in ("yes", "no"), out.text
    think = llm.tokenizer.convert_tokens_to_ids("<think>")
    grammars = GrammarCompiler(llm.tokenizer, llm.core.model_config.vocab_size, [151645])
    mask = grammars.constraint(so, "pending").bitmask(also=think)
    assert mask[think // 32] >> (think % 32) & 1
    assert not grammars.constraint(so, "active").bitmask()[think // 32] >> (think % 32) & 1


def test_bitmask_application_matches_xgrammars_kernel() -> None:
    """The runner's batched mask (a byte lookup, any device) against xgrammar's own CPU kernel,
    on all rows and on some rows of a batch, with a vocabulary that does not fill the last word."""
    import torch
    import xgrammar as xgr

    from cluster.model.logits import apply_token_bitmask

    g = torch.Generator().manual_seed(0)
    vocab = 1000
    words = torch.randint(-2**31, 2**31 - 1, (4, -(-vocab // 32)), dtype=torch.int32, generator=g)
    logits = torch.randn(4, vocab, generator=g)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, words)
    got = logits.clone()
    apply_token_bitmask(got, [0, 1, 2, 3], list(words))
    assert torch.equal(got, want)
    some = logits.clone()
    apply_token_bitmask(some, [1, 3], [words[1], words[3]])
    assert torch.equal(some[[1, 3]], want[[1, 3]]) and torch.equal(some[[0, 2]], logits[[0, 2]])
