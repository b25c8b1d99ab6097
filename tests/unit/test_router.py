"""The router's pure functions, without Serve: which pools a request may go to and in what
order, and how a pool's limits turn a request's SamplingParams into what the pool runs; plus the
Frontend's one check of the sampling fields."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from cluster import RequestError, SamplingParams
from deployments.config import AppConfig
from deployments.frontend import Frontend, SamplingFields
from deployments.router import apply_limits, pool_order


def test_pool_order_follows_the_mode_and_spills_over() -> None:
    both = AppConfig()
    assert pool_order(both, thinking=True) == ["thinking", "fast"]
    assert pool_order(both, thinking=False) == ["fast", "thinking"]
    strict = AppConfig.model_validate({"router": {"spill_over": False}})
    assert pool_order(strict, thinking=True) == ["thinking"]
    assert pool_order(strict, thinking=False) == ["fast"]
    only_thinking = AppConfig.model_validate({"fast": {"enabled": False}, "router": {"spill_over": False}})
    assert pool_order(only_thinking, thinking=False) == ["thinking"]  # the one pool there is serves it


def test_apply_limits_defaults_and_caps() -> None:
    cfg = AppConfig.model_validate({"thinking": {"default_thinking_budget": 100, "max_thinking_budget": 50,
                                                 "default_max_tokens": 300, "max_tokens_limit": 400}})
    pool = cfg.thinking
    out = apply_limits(pool, SamplingParams(max_tokens=None, temperature=0.5), thinking=True)
    assert (out.max_tokens, out.thinking_budget, out.temperature) == (300, 50, 0.5)
    assert apply_limits(pool, SamplingParams(max_tokens=20, thinking_budget=10), thinking=True).thinking_budget == 10
    assert apply_limits(pool, SamplingParams(max_tokens=20, thinking_budget=10), thinking=False).thinking_budget is None
    with pytest.raises(RequestError) as exc:
        apply_limits(pool, SamplingParams(max_tokens=401), thinking=True)
    assert exc.value.param == "max_tokens"
    assert apply_limits(cfg.fast, SamplingParams(max_tokens=None), thinking=True).thinking_budget == 0


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"max_tokens": -1}, "max_tokens"), ({"thinking_budget": -1}, "thinking_budget"),
    ({"stop": [""]}, "stop"), ({"min_p": 1.5}, "min_p"),
])
def test_sampling_fields_are_checked_once_naming_the_field(plain: Frontend, fields: dict, param: str) -> None:
    for thinking in (True, False):
        with pytest.raises(RequestError) as exc:
            plain.sampling(thinking, SamplingFields(**fields))
        assert exc.value.param == param and str(exc.value).startswith(f"{param}: ")


@pytest.fixture(scope="module")
def plain(moe_checkpoint: Path) -> Frontend:
    """A checkpoint whose generation_config.json sets no sampling field, pools without defaults."""
    return Frontend(AppConfig.model_validate({
        "model": str(moe_checkpoint), "fast": {"sampling_defaults": {"temperature": None, "top_p": None, "top_k": None}}}), router=None)


def test_sampling_defaults_and_the_error_crosses_processes_intact(plain: Frontend) -> None:
    p = plain.sampling(False, SamplingFields(top_k=-1, stop="END"))
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.stop) == (None, 1.0, 1.0, 0, 0.0, ["END"])
    err = pickle.loads(pickle.dumps(RequestError("prompt", "too long")))
    assert (err.param, err.message, str(err)) == ("prompt", "too long", "prompt: too long")


def test_unset_sampling_fields_take_the_modes_defaults() -> None:
    """The embedded model ships Qwen3's generation_config.json (0.6 / 0.95 / 20), which thinking
    requests get; the default fast pool sets Qwen3's non-thinking values (0.7 / 0.8 / 20); what a
    request sets wins, and a pool's default may be overridden per field in the config."""
    fe = Frontend(AppConfig(), router=None)
    t, n = fe.sampling(True), fe.sampling(False)
    assert (t.temperature, t.top_p, t.top_k, t.min_p) == (0.6, 0.95, 20, 0.0)
    assert (n.temperature, n.top_p, n.top_k, n.min_p) == (0.7, 0.8, 20, 0.0)
    own = fe.sampling(False, SamplingFields(temperature=0.0, top_p=1.0, top_k=-1, min_p=0.05))
    assert (own.temperature, own.top_p, own.top_k, own.min_p) == (0.0, 1.0, 0, 0.05)
    custom = Frontend(AppConfig.model_validate({"thinking": {"sampling_defaults": {"temperature": 1.0}}}), router=None)
    c = custom.sampling(True)
    assert (c.temperature, c.top_p, c.top_k) == (1.0, 0.95, 20)
    with pytest.raises(ValueError, match="top_p"):
        AppConfig.model_validate({"fast": {"sampling_defaults": {"top_p": 0}}})


def test_requests_beyond_what_the_pools_hold_are_refused_before_any_work() -> None:
    """The ingress's admission gate: running + queued over every replica of every pool; beyond
    it a request is refused (429 / RESOURCE_EXHAUSTED) before its template and tokens are made."""
    from deployments.frontend import Overloaded
    from deployments.frontend.pipeline import admission_capacity

    cfg = AppConfig.model_validate({
        "thinking": {"max_num_seqs": 2, "max_queued_requests": 3},
        "fast": {"max_ongoing_requests": 1, "max_queued_requests": 0, "autoscaling": {"max_replicas": 2}}})
    assert admission_capacity(cfg) == (2 + 3) * 1 + (1 + 0) * 2
    assert admission_capacity(AppConfig.model_validate({"fast": {"max_queued_requests": -1}})) is None
    fe = Frontend(cfg, router=None)
    fe.in_flight, fe.starting = 5, 1
    fe.check_capacity()
    fe.starting = 2
    with pytest.raises(Overloaded, match="holds 7 requests"):
        fe.check_capacity()
