"""Sampling parameters: greedy, temperature, top-k/top-p/min-p, seeds, stops, logprobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.model.sampler import sample


def _draws(logits: torch.Tensor, params: SamplingParams, n: int = 400) -> set[int]:
    g = torch.Generator().manual_seed(0)
    rows = logits.expand(n, -1)
    toks, _, _ = sample(rows, [params] * n, [g] * n)
    return set(toks)


def test_filters_restrict_support() -> None:
    logits = torch.tensor([[4.0, 3.5, 3.0, 1.0, 0.0, -1.0]])
    assert _draws(logits, SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    # probs ~ [0.46, 0.28, 0.17, 0.02, ...]: top_p=0.7 keeps the two tokens reaching 0.7.
    assert _draws(logits, SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}
    # min_p=0.5 keeps tokens with p >= 0.5 * p_max.
    assert _draws(logits, SamplingParams(temperature=1.0, min_p=0.5)) == {0, 1}
    assert _draws(logits, SamplingParams(temperature=1.0)) >= {0, 1, 2, 3}
    assert _draws(logits, SamplingParams(temperature=0.0)) == {0}


def test_temperature_sharpens() -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    g = torch.Generator().manual_seed(0)
    hot, _, _ = sample(logits.expand(2000, -1), [SamplingParams(temperature=5.0)] * 2000, [g] * 2000)
    cold, _, _ = sample(logits.expand(2000, -1), [SamplingParams(temperature=0.2)] * 2000, [g] * 2000)
    assert cold.count(0) > hot.count(0) + 500


def test_logprobs_are_model_log_softmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0, logprobs=True), SamplingParams(temperature=0.7, logprobs=True), SamplingParams()]
    toks, lps, _ = sample(logits, params, [None, torch.Generator().manual_seed(2), None])
    ref = torch.log_softmax(logits, -1)
    assert lps[0] == pytest.approx(ref[0, toks[0]].item(), abs=1e-6)
    assert lps[1] == pytest.approx(ref[1, toks[1]].item(), abs=1e-6)
    assert lps[2] is None


@pytest.fixture(scope="module")
def llm(moe_checkpoint: Path):
    llm = LLM(moe_checkpoint, dtype="float32", num_kv_blocks=128, block_size=8)
    yield llm
    llm.shutdown()


def test_seed_reproducible_independent_of_batch(llm: LLM) -> None:
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate([[1, 2, 3]], p)[0].token_ids
    others = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    batched = llm.generate([[9, 9], [1, 2, 3], [4, 5, 6, 7]], [others, p, others])[1].token_ids
    assert alone == batched
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))[0].token_ids != alone


def test_top_k_one_is_greedy(llm: LLM) -> None:
    greedy = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    topk1 = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=1.3, top_k=1, ignore_eos=True))[0]
    assert greedy.token_ids == topk1.token_ids


def test_max_tokens_and_stop_token_ids(llm: LLM) -> None:
    base = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert len(base.token_ids) == 12 and base.finish_reason == "length"
    stop_tok = base.token_ids[4]
    first = base.token_ids.index(stop_tok)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_eos_stops_unless_ignored(llm: LLM) -> None:
    base = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    eos = base.token_ids[3]
    llm.core.eos_token_ids = frozenset({eos})
    try:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0.0))[0]
        assert out.token_ids[-1] == eos and out.finish_reason == "stop" and out.stop_reason is None
        assert len(out.token_ids) <= 4
        ignored = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
        assert ignored.token_ids == base.token_ids
    finally:
        llm.core.eos_token_ids = frozenset()


def test_stop_strings(llm: LLM) -> None:
    base = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    text = base.text
    assert len(text) > 8
    stop = text[5:8]
    cut = text.index(stop)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=20, temperature=0.0, stop=[stop]))[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    incl = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=20, temperature=0.0, stop=stop, include_stop_str_in_output=True))[0]
    assert incl.text == text[: cut + len(stop)]


def test_logprobs_returned_per_token(llm: LLM) -> None:
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0.0, logprobs=True, ignore_eos=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    assert all(lp <= 0 for lp in out.logprobs)
