"""The front end every protocol shares: API keys, the model-name check, capacity, then the one
chat pipeline (tools, Qwen3's template and mode, the prompt limit, `SamplingParams` built once,
the output constraint), the pool call through the router, n > 1 fan-out, request metrics, and
drain. The adapters in deployments/api/ translate a request into a `FrontRequest`, call `open`
inside `refusals` (which counts the request when it is refused), and render the `Opened`
request's deltas (or whole choices); they map the errors to their codes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from jinja2 import TemplateError

from cluster import ModelConfig, RequestError, RequestOutput, SamplingParams, load_tokenizer, render_chat
from cluster.config import StructuredOutput
from cluster.default_model import default_model_path
from deployments.auth import ApiKeys, load_keys
from deployments.config import AppConfig
from deployments.frontend.deltas import ChoiceParser, Choice, Delta, collect_choice
from deployments.frontend.errors import REQUEST_ERRORS, ModelNotFound, Unauthenticated, http_status
from deployments.frontend.fanout import merged, more_choices
from deployments.frontend.request import FrontRequest
from deployments.frontend.sampling import SamplingFields, build_params, sampling_defaults
from deployments.frontend.thinking import decide_thinking
from deployments.frontend.tool_calls import ToolUse, check_tools
from deployments.metrics import RouterMetrics
from deployments.pool import PoolRequest
from deployments.router import InstanceLost, Overloaded, PoolRouter, PoolsUnavailable, Routed


def admission_capacity(cfg: AppConfig) -> int | None:
    """Requests the pools can hold at once at their largest (running and queued, every replica
    of every enabled pool); None when a pool's queue is unbounded."""
    pools = cfg.pools().values()
    if any(p.max_queued_requests < 0 for p in pools):
        return None
    return sum((p.ongoing_limit + p.max_queued_requests) * p.autoscaling.max_replicas for p in pools)


@dataclass
class Prepared:
    """A request through the pipeline, before it goes to a pool."""

    prompt_ids: list[int]
    params: SamplingParams
    thinking: bool
    tools: ToolUse


@dataclass
class Opened:
    """A started request: the pool serving it, the retries it took, and its choices' outputs,
    read as typed deltas (`deltas`) or whole (`whole`)."""

    id: str
    pool: str
    retries: int
    prompt_ids: list[int]
    thinking: bool
    raw: bool
    tools: ToolUse
    streams: list[AsyncIterator[RequestOutput]]

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every choice's deltas as they come (closing this cancels every choice)."""
        parsers = [ChoiceParser(i, self.thinking, self.raw, self.tools) for i in range(len(self.streams))]
        async for i, out in merged(self.streams):
            yield parsers[i].feed(out)

    async def whole(self) -> list[Choice]:
        """Every choice, whole; one failing cancels the others and its error is the request's."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(collect_choice(i, s, self.thinking, self.raw, self.tools))
                         for i, s in enumerate(self.streams)]
        except BaseExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        return [t.result() for t in tasks]


class Frontend:
    def __init__(self, cfg: AppConfig, router: PoolRouter) -> None:
        self.cfg = cfg
        self.router = router
        self.keys = ApiKeys(load_keys(cfg.api_keys))
        model_path = cfg.model or str(default_model_path())
        self.model_path = model_path  # what /v1/models reports as `root`
        self.tokenizer = load_tokenizer(model_path)
        mc = ModelConfig.from_pretrained(model_path)
        context = min(min(p.engine.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
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

    def admit(self, model: str | None) -> None:
        """The checks before a request is even read: capacity, then the model's name."""
        self.check_capacity()
        self.check_model(model)

    def check_capacity(self) -> None:
        """Refuses a request at once (429) when the pools could not hold it anyway: checked
        before the chat template and the tokenizer run, so that under many times the capacity
        the refusals stay cheap and the admitted requests keep the ingress's CPU."""
        if self.capacity is not None and self.active >= self.capacity:
            raise Overloaded(f"the server holds {self.capacity} requests (running and queued over all pools); "
                             "retry later")

    def check_model(self, model: str | None) -> None:
        """A wrong name is a 404."""
        if model and model != self.model_name:
            raise ModelNotFound(f"model: '{model}' does not exist; this server serves '{self.model_name}'")

    # -- the pipeline ---------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, Any]], explicit: bool | None,
                    tools: list[dict[str, Any]] | None = None, param: str = "messages") -> tuple[bool, list[int]]:
        """Thinking mode and the prompt ids, through Qwen3's own template (with its tools section
        when `tools` are offered). Messages the template cannot render are a RequestError naming
        `param` (the field that carried them), not a server error."""
        if not messages:
            raise RequestError(param, "at least one message is required")
        thinking = decide_thinking(explicit, messages, self.cfg.router.default_thinking)
        extra = {"tools": tools} if tools else {}
        try:
            prompt = render_chat(self.tokenizer, messages, enable_thinking=thinking, **extra)
        except (TemplateError, ValueError, TypeError) as exc:
            raise RequestError(param, f"the chat template cannot render these messages: {exc}") from None
        return thinking, self.encode(prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prepare(self, req: FrontRequest) -> Prepared:
        """Tools, mode and prompt ids, then the sampling parameters with the output constraint
        (a required tool call's grammar, or the client's, after </think> when thinking). A raw
        prompt thinks when it asks for a thinking budget (it left <think> open). Raises
        RequestError naming the field."""
        if req.raw:
            tools = ToolUse()
            thinking = req.sampling.thinking_budget is not None
            prompt = req.prompt
            ids = list(prompt) if isinstance(prompt, list) else self.encode(prompt or "")
        else:
            tools = check_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
            thinking, ids = self.chat_prompt(req.messages or [], req.thinking, tools.for_template(), req.prompt_param)
        own = replace(req.constraint, after_think=thinking) if req.constraint is not None else None
        return Prepared(ids, self.sampling(thinking, req.sampling, tools.constraint(own, thinking)), thinking, tools)

    def sampling(self, thinking: bool, fields: SamplingFields | None = None,
                 constraint: StructuredOutput | None = None) -> SamplingParams:
        """The sampling parameters, with the mode's defaults for the fields left unset."""
        return build_params(fields or SamplingFields(), self.sampling_defaults[thinking], constraint)

    async def open(self, req: FrontRequest, id_prefix: str = "req-") -> Opened:
        """The request through the pipeline and started on a pool, with its n choices (a seeded
        request's choice i uses seed + i, so the choices differ but the request reproduces)."""
        p = self.prepare(req)
        rid = req.request_id or f"{id_prefix}{uuid.uuid4().hex}"
        routed = await self.start(req.route, p.prompt_ids, p.params, p.thinking, req.prompt_param, rid)
        streams = [routed.chunks]
        if req.n > 1:
            async def start(i: int) -> AsyncIterator[RequestOutput]:
                seed = None if p.params.seed is None else p.params.seed + i
                params = replace(p.params, seed=seed)
                return (await self.start(req.route, p.prompt_ids, params, p.thinking, req.prompt_param, f"{rid}-{i}")).chunks
            streams = await more_choices(routed.chunks, req.n, start)
        return Opened(rid, routed.pool, routed.retries, p.prompt_ids, p.thinking, req.raw, p.tools, streams)

    async def start(
        self, route: str, prompt_ids: list[int], params: SamplingParams, thinking: bool, prompt_param: str,
        request_id: str,
    ) -> Routed:
        """Checks the prompt against the limits and starts it on a pool; returns the pool's name,
        its outputs (which end in InstanceLost if the pool fails mid-stream) and the retries it
        took. Raises RequestError (naming `prompt_param` for the prompt), Overloaded or
        PoolsUnavailable."""
        start = time.monotonic()
        request = PoolRequest(request_id, prompt_ids, params, thinking)
        self.starting += 1
        try:
            if self.draining:
                raise PoolsUnavailable("the server is shutting down and takes no new requests; retry on another replica")
            if len(prompt_ids) > self.prompt_limit:
                raise RequestError(
                    prompt_param, f"the prompt is {len(prompt_ids)} tokens, over the limit of {self.prompt_limit}")
            routed = await self.router.stream(request)
        except RequestError as exc:
            if exc.param in (None, "prompt"):
                raise RequestError(prompt_param, exc.message) from None
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

    # -- metrics --------------------------------------------------------------------------------
    def _count(self, route: str, status: str) -> None:
        self.metrics.requests.inc(1, tags={"pool": "none", "route": route, "status": status})

    @contextmanager
    def refusals(self, route: str) -> Iterator[None]:
        """Counts a request refused before its stream began under `route`, with the code it gets
        (400, 401, 404, 429, 503): the adapter's own checks (a field the server does not honour, a
        batch over the limit) as well as the pipeline's and the router's."""
        try:
            yield
        except REQUEST_ERRORS as exc:
            self._count(route, str(http_status(exc)))
            raise

    def count_refused(self, route: str, status: int) -> None:
        """A request refused before it reached its adapter: a body that did not validate (400), no
        or a wrong key (401), a body over the size limit (413)."""
        self._count(route, str(status))

    async def _measured(self, chunks: AsyncIterator[RequestOutput], tags: dict[str, str], start: float
                        ) -> AsyncIterator[RequestOutput]:
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
        except Exception:  # a client that left raises GeneratorExit / CancelledError: `cancelled`
            status = "500"
            raise
        finally:
            self.in_flight -= 1
            self.metrics.requests.inc(1, tags={**tags, "status": status})
            self.metrics.latency.observe(time.monotonic() - start, tags=tags)
            await chunks.aclose()  # a client that left: the pool's stream is cancelled now, not at GC
            if last is not None:
                self.metrics.tokens_in.inc(last.num_prompt_tokens, tags=tags)
                if last.num_cached_tokens:
                    self.metrics.tokens_cached.inc(last.num_cached_tokens, tags=tags)
                if last.num_output_tokens:  # max_tokens 0 (the prompt only); Ray's counters refuse 0
                    self.metrics.tokens_out.inc(last.num_output_tokens, tags=tags)
