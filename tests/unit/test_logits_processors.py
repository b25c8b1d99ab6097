"""Logit bias, presence / frequency / repetition penalties and top logprobs: the processors
against their definitions (OpenAI's and vLLM's), and through the engine against transformers'
own repetition penalty, for greedy and sampled rows in one batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.config import RequestError
from cluster.model.logits import process_logits
from cluster.model.sampler import sample, scratch
from tests.helpers.models import hf_model


def test_penalties_and_bias_follow_their_definitions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(logit_bias={3: 100.0, 4: -7.5}),
    ]
    outputs = [[1, 1, 2], [5], None]
    prompts = [None, [6, 6, 7], None]
    got = process_logits(logits, params, outputs, prompts)
    want = logits.clone()
    for t, n in ((1, 2), (2, 1)):
        want[0, t] -= 0.5 + 0.25 * n
    for t in (5, 6, 7):
        want[1, t] = want[1, t] / 2 if want[1, t] > 0 else want[1, t] * 2
    want[2, 3] += 100
    want[2, 4] -= 7.5
    assert torch.allclose(got, want)
    assert torch.equal(logits, logits.clone()), "the model's logits are not modified in place"
    plain = [SamplingParams()] * 3
    assert process_logits(logits, plain, [None] * 3, [None] * 3) is not None


def test_bf16_logits_become_float32_in_a_buffer_kept_between_steps() -> None:
    """The float32 copy of a step's bf16 logits lands in the same buffer every step (a fresh
    [rows, vocab] tensor is a new mapping whose page faults cost most of the copy on a CPU), holds
    exactly the model's values, and is not the sampler's own work buffer."""
    torch.manual_seed(0)
    first, second = torch.randn(4, 1000).bfloat16(), torch.randn(4, 1000).bfloat16()
    plain = [SamplingParams()] * 4
    a = process_logits(first, plain, [None] * 4, [None] * 4)
    assert a.dtype == torch.float32 and torch.equal(a, first.float())
    ptr = a.data_ptr()
    b = process_logits(second, plain, [None] * 4, [None] * 4)
    assert b.data_ptr() == ptr and torch.equal(b, second.float())
    biased = process_logits(first, [SamplingParams(logit_bias={3: 1.0})] * 4, [None] * 4, [None] * 4)
    assert biased.data_ptr() == ptr and torch.equal(biased[:, 4:], first.float()[:, 4:])
    assert scratch((4, 1000), torch.float32, first.device).data_ptr() != ptr
    # a full-vocabulary sampled row works in the sampler's buffer, leaving the logits as they were
    wide = SamplingParams(temperature=1.0, top_p=0.99)  # its nucleus reaches past the top candidates
    processed = process_logits(second[:1], [wide], [None], [None])
    sample(processed, [wide], [torch.Generator().manual_seed(1)], raw=second[:1])
    assert torch.equal(processed, second[:1].float())


def test_bias_decides_greedy_and_logprobs_stay_the_models() -> None:
    """A +100 bias makes a token the greedy choice; the logprob returned is still the model's
    (raw) one, and top_logprobs lists the model's most likely tokens in order."""
    logits = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), dim=-1)
    p = SamplingParams(temperature=0, logit_bias={3: 100.0}, top_logprobs=2)
    processed = process_logits(logits, [p], [None], [None])
    toks, lps, tops = sample(processed, [p], [None], raw=logits)
    assert toks == [3]
    assert lps[0] == pytest.approx(float(logits[0, 3]))
    assert [t for t, _ in tops[0]] == [0, 1] and tops[0][0][1] == pytest.approx(float(logits[0, 0]))


def test_repetition_penalty_matches_transformers(moe_checkpoint: Path) -> None:
    """Greedy with repetition_penalty 1.5 (prompt and output tokens) against transformers'
    RepetitionPenaltyLogitsProcessor, in a batch with unpenalised and sampled rows."""
    prompt = [5, 9, 5, 9, 5, 9, 17]
    ref = hf_model(moe_checkpoint)
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                        pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(moe_checkpoint, dtype="float32", num_kv_blocks=64)
    try:
        outs = llm.generate([prompt, prompt, [3, 4, 5]], [
            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.5),
            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=0.8, ignore_eos=True, seed=1, frequency_penalty=1.0)])
        assert outs[0].token_ids == want
        assert outs[1].token_ids != want, "the penalty changed the output (else this test shows nothing)"
    finally:
        llm.shutdown()


def test_frequency_penalty_stops_repeats_and_top_logprobs_reach_the_output(moe_checkpoint: Path) -> None:
    """A strong frequency penalty makes greedy output repeat no token; top_logprobs come per
    token with the chosen token's logprob among them (greedy: the first)."""
    llm = LLM(moe_checkpoint, dtype="float32", num_kv_blocks=64)
    try:
        (plain,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        assert len(set(plain.token_ids)) < 30, "the model repeats without a penalty (else this test shows nothing)"
        (out,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                          frequency_penalty=2.0, top_logprobs=3))
        assert len(set(out.token_ids)) == 30
        assert len(out.top_logprobs) == 30 and all(len(t) == 3 for t in out.top_logprobs)
        assert out.top_logprobs[0][0][0] == out.token_ids[0]
        assert out.top_logprobs[0][0][1] == pytest.approx(out.logprobs[0])
    finally:
        llm.shutdown()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {1: 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"top_logprobs": 21}, "top_logprobs"),
])
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(RequestError) as exc:
        SamplingParams(**kwargs)
    assert exc.value.param == field


def test_logit_bias_outside_the_vocabulary_is_refused(moe_checkpoint: Path) -> None:
    llm = LLM(moe_checkpoint, dtype="float32", num_kv_blocks=16)
    try:
        with pytest.raises(RequestError, match="logit_bias: token id 99999999"):
            llm.generate([[1, 2]], SamplingParams(logit_bias={99999999: 1.0}))
    finally:
        llm.shutdown()
