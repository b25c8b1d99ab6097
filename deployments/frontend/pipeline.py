"""The protocol-neutral front end that the OpenAI HTTP API and the gRPC API share: API keys, the
model-name check, Qwen3's chat rendering and mode, the prompt limit, `SamplingParams` built and
validated once, the pool call through the router, request metrics, and usage. The protocol
adapters (openai_api.py, grpc_api.py) only translate their messages and map the errors below to
their status codes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from cluster import ModelConfig, RequestError, SamplingParams, load_tokenizer, render_chat
from cluster.config import StructuredOutput
from cluster.default_model import default_model_path
from deployments.auth import ApiKeys, load_keys
from deployments.chat import decide_thinking
from deployments.config import AppConfig, PoolConfig
from deployments.metrics import RouterMetrics
from deployments.pool import PoolChunk, PoolRequest
from deployments.router import InstanceLost, Overloaded, PoolRouter, PoolsUnavailable, Routed

__all__ = ["Frontend", "InstanceLost", "ModelNotFound", "Overloaded", "PoolsUnavailable", "RequestError", "Routed", "Unauthenticated",
           "Usage"]


API_SAMPLING_DEFAULTS: dict[str, float] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


def sampling_defaults(model: ModelConfig, pool: PoolConfig) -> dict[str, float]:
    """What an unset sampling field becomes: the pool's default, else the model's
    generation_config.json, else the OpenAI API's."""
    pool_set = {k: v for k, v in pool.sampling_defaults.model_dump().items() if v is not None}
    return {**API_SAMPLING_DEFAULTS, **dict(model.sampling_defaults), **pool_set}


def admission_capacity(cfg: AppConfig) -> int | None:
    """Requests the pools can hold at once at their largest (running and queued, every replica
    of every enabled pool); None when a pool's queue is unbounded."""
    pools = cfg.pools().values()
    if any(p.max_queued_requests < 0 for p in pools):
        return None
    return sum((p.ongoing_limit + p.max_queued_requests) * p.autoscaling.max_replicas for p in pools)


class ModelNotFound(LookupError):
    """The request names a model this server does not serve (404 / NOT_FOUND)."""


class Unauthenticated(PermissionError):
    """No or a wrong API key (401 / UNAUTHENTICATED)."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Frontend:
    def __init__(self, cfg: AppConfig, router: PoolRouter) -> None:
        self.cfg = cfg
        self.router = router
        self.keys = ApiKeys(load_keys(cfg.api_keys))
        model_path = cfg.model or str(default_model_path())
        self.tokenizer = load_tokenizer(model_path)
        mc = ModelConfig.from_pretrained(model_path)
        context = min(min(p.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
                      for p in cfg.pools().values())
        self.max_model_len = context
        self.prompt_limit = min(context - 1, cfg.limits.max_prompt_tokens or context)
        self.created = int(time.time())
        self.metrics = RouterMetrics()
        self.sampling_defaults = {True: sampling_defaults(mc, cfg.thinking), False: sampling_defaults(mc, cfg.fast)}
        self.in_flight = 0       # requests started and not yet ended (what a drain waits for)
        self.starting = 0        # requests being routed to a pool
        self.draining = False    # set by `drain`: new requests are refused with 503
        self.capacity = admission_capacity(cfg)

    @property
    def model_name(self) -> str:
        return self.cfg.served_model_name

    # -- checks ---------------------------------------------------------------------------------
    def authorize(self, authorization: str | None) -> None:
        if not self.keys.check(authorization):
            raise Unauthenticated("authorization: missing or invalid API key (send 'Authorization: Bearer <key>')")

    def check_capacity(self, route: str) -> None:
        """Refuses a request at once (429) when the pools could not hold it anyway: checked
        before the chat template and the tokenizer run, so that under many times the capacity
        the refusals stay cheap and the admitted requests keep the ingress's CPU."""
        if self.capacity is not None and self.active >= self.capacity:
            self._count(route, "429")
            raise Overloaded(f"the server holds {self.capacity} requests (running and queued over all pools); "
                             "retry later")

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise ModelNotFound(f"model: '{model}' does not exist; this server serves '{self.model_name}'")

    # -- the request ----------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, Any]], explicit: bool | None,
                    tools: list[dict[str, Any]] | None = None) -> tuple[bool, list[int]]:
        """Thinking mode and the prompt ids, through Qwen3's own template (with its tools section
        when `tools` are offered)."""
        thinking = decide_thinking(explicit, messages, self.cfg.router.default_thinking)
        extra = {"tools": tools} if tools else {}
        prompt = render_chat(self.tokenizer, messages, enable_thinking=thinking, **extra)
        return thinking, self.encode(prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def sampling(
        self, thinking: bool, *, max_tokens: int | None = None, temperature: float | None = None,
        top_p: float | None = None, top_k: int | None = None, min_p: float | None = None, seed: int | None = None,
        stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
        logprobs: bool = False, thinking_budget: int | None = None, top_logprobs: int = 0,
        presence_penalty: float | None = None, frequency_penalty: float | None = None,
        repetition_penalty: float | None = None, logit_bias: dict[Any, float] | None = None,
        prompt_logprobs: int | None = None, structured_output: StructuredOutput | None = None,
    ) -> SamplingParams:
        """The one place a request's sampling fields are checked, whichever API they came by: the
        mode's defaults for the fields left unset, OpenAI's temperature range here, the engine's
        own rules in SamplingParams. Raises RequestError naming the field."""
        given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
        d = self.sampling_defaults[thinking]
        temperature, top_p, top_k, min_p = (d[k] if v is None else v for k, v in given.items())
        if not 0 <= temperature <= 2:
            raise RequestError("temperature", f"must be in [0, 2], got {temperature!r}")
        top_k = 0 if top_k == -1 else top_k  # -1 disables it, as in vLLM
        return SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
            stop=[stop] if isinstance(stop, str) else list(stop or []), stop_token_ids=list(stop_token_ids),
            ignore_eos=ignore_eos, logprobs=logprobs, thinking_budget=thinking_budget, top_logprobs=top_logprobs,
            presence_penalty=presence_penalty or 0.0, frequency_penalty=frequency_penalty or 0.0,
            repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty, logit_bias=logit_bias or {},
            prompt_logprobs=prompt_logprobs, structured_output=structured_output,
        )

    async def start(
        self, route: str, prompt_ids: list[int], params: SamplingParams, thinking: bool, prompt_param: str,
        request_id: str | None = None,
    ) -> Routed:
        """Checks the prompt against the limits and starts it on a pool; returns the pool's name,
        its chunks (which end in InstanceLost if the pool fails mid-stream) and the retries it
        took. Raises RequestError (naming `prompt_param` for the prompt), Overloaded or
        PoolsUnavailable."""
        start = time.monotonic()
        request = PoolRequest(request_id or f"req-{uuid.uuid4().hex}", prompt_ids, params, thinking)
        self.starting += 1
        try:
            if self.draining:
                raise PoolsUnavailable("the server is shutting down and takes no new requests; retry on another replica")
            if len(prompt_ids) > self.prompt_limit:
                raise RequestError(
                    prompt_param, f"the prompt is {len(prompt_ids)} tokens, over the limit of {self.prompt_limit}")
            routed = await self.router.stream(request)
        except RequestError as exc:
            self._count(route, "400")
            if exc.param in (None, "prompt"):
                raise RequestError(prompt_param, exc.message) from None
            raise
        except Overloaded:
            self._count(route, "429")
            raise
        except PoolsUnavailable:
            self._count(route, "503")
            raise
        finally:
            self.starting -= 1
        tags = {"pool": routed.pool, "route": route}
        if routed.retries:
            self.metrics.retries.inc(routed.retries, tags=tags)
        return routed._replace(chunks=self._measured(routed.chunks, tags, start))

    async def drain(self, grace_s: float, poll_s: float = 0.1) -> int:
        """Stops admitting (new requests get 503, /health says draining) and waits up to
        `grace_s` for the admitted requests to end (queued ones too); those streaming then are cancelled
        and end with a retriable 503. Returns how many had to be cancelled."""
        self.draining = True
        if not await self._until_idle(grace_s, poll_s):
            return 0
        cancelled = self.router.end_open_requests(f"the server shut down before this request finished "
                                                  f"(grace period {grace_s:g}s)")
        await self._until_idle(10.0, poll_s)  # the error events go out before the proxy stops
        return cancelled

    @property
    def active(self) -> int:
        """Requests admitted and not yet ended: being routed (or queued for their first token) or streaming."""
        return self.in_flight + self.starting

    async def _until_idle(self, timeout_s: float, poll_s: float) -> int:
        """Waits up to `timeout_s` for no active request; returns how many are still active."""
        deadline = time.monotonic() + timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return self.active

    def usage(self, last: PoolChunk, thinking: bool) -> Usage:
        """With thinking off the template closed <think> in the prompt, so nothing is reasoning."""
        return Usage(last.num_prompt_tokens, last.num_output_tokens, last.num_reasoning_tokens if thinking else 0)

    # -- metrics --------------------------------------------------------------------------------
    def _count(self, route: str, status: str) -> None:
        self.metrics.requests.inc(1, tags={"pool": "none", "route": route, "status": status})

    async def _measured(self, chunks: AsyncIterator[PoolChunk], tags: dict[str, str], start: float
                        ) -> AsyncIterator[PoolChunk]:
        """Passes chunks through, recording TTFT, inter-token latency, tokens and latency."""
        last_t, last = None, None
        status = "cancelled"
        self.in_flight += 1
        try:
            async for c in chunks:
                now = time.monotonic()
                if last_t is None:
                    self.metrics.ttft.observe(now - start, tags=tags)
                else:
                    self.metrics.itl.observe(now - last_t, tags=tags)
                last_t, last = now, c
                yield c
            status = "200"
        except InstanceLost:
            status = "503"
            raise
        finally:
            self.in_flight -= 1
            self.metrics.requests.inc(1, tags={**tags, "status": status})
            self.metrics.latency.observe(time.monotonic() - start, tags=tags)
            await chunks.aclose()  # a client that left: the pool's stream is cancelled now, not at GC
            if last is not None:
                self.metrics.tokens_in.inc(last.num_prompt_tokens, tags=tags)
                if last.num_output_tokens:  # max_tokens 0 (the prompt only); Ray's counters refuse 0
                    self.metrics.tokens_out.inc(last.num_output_tokens, tags=tags)
