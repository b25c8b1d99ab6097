"""A request's sampling, built once for every protocol: the fields the client set, the mode's
defaults for the ones it left unset (the pool's, else the model's generation_config.json, else
the OpenAI API's), OpenAI's temperature range, then the engine's own rules in SamplingParams."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cluster import ModelConfig, RequestError, SamplingParams
from cluster.config import StructuredOutput
from deployments.config import PoolConfig

API_SAMPLING_DEFAULTS: dict[str, float] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


def sampling_defaults(model: ModelConfig, pool: PoolConfig) -> dict[str, float]:
    """What an unset sampling field becomes: the pool's default, else the model's
    generation_config.json, else the OpenAI API's."""
    pool_set = {k: v for k, v in pool.sampling_defaults.model_dump().items() if v is not None}
    return {**API_SAMPLING_DEFAULTS, **dict(model.sampling_defaults), **pool_set}


@dataclass
class SamplingFields:
    """The sampling fields a client set, by whichever API: None (or empty) is unset."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    thinking_budget: int | None = None
    prompt_logprobs: int | None = None


def build_params(fields: SamplingFields, defaults: dict[str, float], constraint: StructuredOutput | None
                 ) -> SamplingParams:
    """The one place a request's sampling fields are checked; raises RequestError naming the field."""
    given = {"temperature": fields.temperature, "top_p": fields.top_p, "top_k": fields.top_k, "min_p": fields.min_p}
    temperature, top_p, top_k, min_p = (defaults[k] if v is None else v for k, v in given.items())
    if not 0 <= temperature <= 2:
        raise RequestError("temperature", f"must be in [0, 2], got {temperature!r}")
    top_k = 0 if top_k == -1 else top_k  # -1 disables it, as in vLLM
    stop = fields.stop
    return SamplingParams(
        max_tokens=fields.max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=fields.seed,
        stop=[stop] if isinstance(stop, str) else list(stop or []), stop_token_ids=list(fields.stop_token_ids),
        ignore_eos=fields.ignore_eos, logprobs=fields.logprobs, thinking_budget=fields.thinking_budget,
        top_logprobs=fields.top_logprobs, presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        repetition_penalty=1.0 if fields.repetition_penalty is None else fields.repetition_penalty,
        logit_bias=fields.logit_bias or {}, prompt_logprobs=fields.prompt_logprobs, structured_output=constraint,
    )
