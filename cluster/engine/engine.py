"""`Engine` (async, streaming, accepts requests at any time) and `LLM` (offline, vLLM-like).

The engine steps on its own thread so that the caller's event loop (a Serve replica's) stays
free; outputs cross back with `call_soon_threadsafe`. Every wait is bounded: a stream raises if
the engine thread dies or no output arrives within `request_timeout_s`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence as Seq
from pathlib import Path
from typing import Any, TypedDict

import torch
from pydantic import ValidationError
from tqdm.auto import tqdm

from cluster.config import EngineConfig, ModelConfig, ParallelConfig, RequestError, SamplingParams, field_errors
from cluster.default_model import default_model_path
from cluster.engine.core import EngineCore, RequestOutput
from cluster.engine.tokenizer import render_chat

log = logging.getLogger(__name__)

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class EngineDeadError(RuntimeError):
    """The engine's step loop failed; every request in flight gets this."""


def configs_from_kwargs(**options: Any) -> tuple[EngineConfig, ParallelConfig]:
    """vLLM-style keyword options (`LLM(model, max_model_len=..., attention_shards=...)`) to the
    typed configs, by the dataclasses' field names. An unknown name raises TypeError naming it;
    a bad value a one-line ValueError naming the field (not pydantic's report)."""
    names = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (EngineConfig, ParallelConfig)}
    unknown = sorted(set(options).difference(*names.values()))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    built, errors = [], []
    for cls, fields in names.items():
        try:
            built.append(cls(**{k: v for k, v in options.items() if k in fields}))
        except ValidationError as exc:
            errors.append(field_errors(exc))
    if errors:
        raise ValueError("; ".join(errors))
    return built[0], built[1]


def _build_core(
    model: str | Path | None, dtype: str | torch.dtype, engine: EngineConfig | None, parallel: ParallelConfig | None,
) -> EngineCore:
    """The core, from typed configs only (a dict of options is LLM's form: configs_from_kwargs)."""
    for name, value, cls in (("engine", engine, EngineConfig), ("parallel", parallel, ParallelConfig)):
        if value is not None and not isinstance(value, cls):
            raise TypeError(f"{name}: expected cluster.{cls.__name__}, got {type(value).__name__}")
    return EngineCore(model or default_model_path(), dtype=dtype, config=engine or EngineConfig(),
                      parallel=parallel or ParallelConfig())


class EngineStats(TypedDict):
    """What a server reads of a running engine (gauges, the pool's stats), summed over shards; a
    plain dict at run time, so a caller can add its own keys to it."""

    running: int
    waiting: int
    kv_blocks_free: int
    kv_blocks_total: int
    instance_placement_group: str | None  # hex id of the instance's Ray placement group, if it has one
    instance_actors: dict[str, str]       # role ("expert-group-1") -> Ray actor name


class Engine:
    """Async engine: `async for out in engine.generate(prompt, params)` streams deltas."""

    def __init__(
        self, model: str | Path | None = None, *, engine: EngineConfig | None = None,
        parallel: ParallelConfig | None = None, dtype: str | torch.dtype = "auto", request_timeout_s: float = 600.0,
    ) -> None:
        self.core = _build_core(model, dtype, engine, parallel)
        self.tokenizer = self.core.tokenizer
        self.request_timeout_s = request_timeout_s
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="q3serve-engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
        coalesce: bool = False, stream_interval: int = 1, stream_max_delay_ms: float | None = None,
        stream_interval_min_streams: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Streams one RequestOutput per engine step that gave the request tokens; the last has
        finished=True. With `coalesce`, the steps that finished while the caller was busy come
        as one output (a server that must not send a message per token). With `stream_interval`
        N > 1 (vLLM's option of that name), after the first output every output holds at least
        N tokens, or is the last: fewer messages per stream where throughput matters more than
        smoothness. `stream_max_delay_ms` bounds that in time: a held output goes out once its oldest
        token has waited this long, so a reader sees a smooth stream when steps are quick and the
        message count still falls when they are slow. `stream_interval_min_streams` holds tokens only
        while at least that many requests stream from this engine: a saturated server sends fewer
        messages (its CPU goes to the tokens), one with room streams every token. Leaving the loop
        early (or cancelling) aborts the request and frees its KV blocks."""
        if stream_interval < 1:
            raise RequestError("stream_interval", f"must be at least 1, got {stream_interval}")
        if stream_max_delay_ms is not None and stream_max_delay_ms < 0:
            raise RequestError("stream_max_delay_ms", f"must be at least 0, got {stream_max_delay_ms}")
        if not self.healthy:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        rid = request_id or uuid.uuid4().hex
        req = self.core.make_request(prompt, params or SamplingParams(), rid)
        out_q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                raise RequestError("request_id", f"{rid!r} is already running")
            self._streams[rid] = (asyncio.get_running_loop(), out_q)
        self._inbox.put(("add", req))
        finished = False
        held: RequestOutput | None = None  # what waits for stream_interval tokens
        held_until = 0.0  # when the held output goes out anyway (stream_max_delay_ms)
        sent_first = False
        try:
            while True:
                wait = self.request_timeout_s
                if held is not None and stream_max_delay_ms is not None:
                    wait = max(0.0, held_until - time.monotonic())
                try:
                    item = await asyncio.wait_for(out_q.get(), timeout=wait)
                except asyncio.TimeoutError:
                    if held is None or stream_max_delay_ms is None:
                        raise TimeoutError(f"request {rid}: no output within {self.request_timeout_s}s") from None
                    item, held = held, None  # its oldest token waited long enough
                    yield item
                    continue
                if isinstance(item, BaseException):
                    finished = True
                    if held is not None:
                        yield held
                    raise item
                failure = None
                fresh = held is None  # this output starts a new held chunk (if it is held)
                if held is not None:
                    held.absorb(item)
                    item, held = held, None
                while coalesce and not item.finished and not out_q.empty():
                    later = out_q.get_nowait()
                    if isinstance(later, BaseException):
                        failure = later  # raised once what came before it is delivered
                        break
                    item.absorb(later)
                finished = item.finished or failure is not None
                busy = len(self._streams) >= stream_interval_min_streams
                if not finished and sent_first and busy and len(item.delta_token_ids) < stream_interval:
                    if fresh and stream_max_delay_ms is not None:
                        held_until = time.monotonic() + stream_max_delay_ms / 1000
                    held = item
                    continue
                sent_first = True
                yield item
                if failure is not None:
                    raise failure
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not finished:
                self._inbox.put(("abort", rid))

    async def chat(
        self, messages: Messages, params: SamplingParams | None = None, enable_thinking: bool = True,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        prompt = render_chat(self.tokenizer, messages, enable_thinking=enable_thinking)
        async for out in self.generate(prompt, params, request_id):
            yield out

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def expert_usage(self) -> torch.Tensor:
        return self.core.expert_usage().clone()

    def stats(self) -> EngineStats:
        """Queue and KV-cache state, summed over attention shards, and where the instance runs.
        Plain reads of counters the step thread writes: a gauge may be one step old."""
        shards = self.core.shards
        executor = self.core.executor
        pg = getattr(executor, "pg", None)
        return {
            "running": sum(len(s.running) for s in shards), "waiting": sum(len(s.waiting) for s in shards),
            "kv_blocks_free": sum(s.blocks.num_free for s in shards),
            "kv_blocks_total": sum(s.blocks.num_blocks for s in shards),
            "instance_placement_group": pg.id.hex() if pg is not None else None,
            "instance_actors": dict(getattr(executor, "actor_names", {})),
        }

    @property
    def model_config(self) -> ModelConfig:
        """The served checkpoint's config (its `moe_layers` index expert_usage())."""
        return self.core.model_config

    @property
    def model_path(self) -> Path:
        """The checkpoint directory (`model_identity(engine.model_path)` names it in usage files)."""
        return self.core.model_path

    @property
    def placement(self) -> Any:
        """The expert-parallel instance's current ExpertPlacement; None in a single process."""
        return getattr(self.core.executor, "placement", None)

    async def between_steps(self, fn: Callable[[], Any], timeout_s: float = 600.0) -> Any:
        """Runs `fn` on the step loop's thread between two steps, so nothing of the model runs
        meanwhile; requests in flight just wait for it."""
        if not self.healthy:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, done)))
        return await asyncio.wait_for(asyncio.wrap_future(done), timeout_s)

    async def replan(self, placement: Any, timeout_s: float = 600.0) -> dict:
        """Moves the expert-parallel instance to a new expert placement under load (see
        RayExecutor.replan); requests in flight pause for the move and go on unchanged."""
        return await self.between_steps(lambda: self.core.replan(placement), timeout_s)

    @property
    def thread_id(self) -> int | None:
        """The step loop's OS thread id (its CPU priority is the one that counts)."""
        return self._thread.native_id

    def check_health(self) -> None:
        """Raises if the step loop died or an actor of the instance is gone."""
        if not self.healthy:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        self.core.executor.check_health()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stops the step loop, then every actor of the instance. Streams still open end with
        EngineDeadError at once (a replica stopped past its drain period), not at their timeout."""
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout_s)
        if self.error is None:
            self.error = EngineDeadError("the engine was shut down")
        with self._lock:
            streams = list(self._streams)
        for rid in streams:
            self._deliver(rid, EngineDeadError(f"request {rid}: the engine was shut down before it finished"))
        self.core.shutdown()

    # -- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.core.has_work())
                if self.core.has_work():
                    for out in self.core.step():
                        self._deliver(out.request_id, out)
        except BaseException as exc:  # noqa: BLE001 - every stream must hear about it
            log.exception("engine step loop failed")
            self.error = exc
            with self._lock:
                streams = list(self._streams)
            for rid in streams:
                self._deliver(rid, EngineDeadError(f"engine failed: {exc!r}"))

    def _drain(self, block: bool) -> None:
        try:
            op, arg = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if op == "add":
                self.core.add(arg)
            elif op == "abort":
                self.core.abort(arg)
            elif op == "call":
                fn, done = arg
                try:
                    done.set_result(fn())
                except Exception as exc:  # noqa: BLE001 - the caller gets it; the loop goes on
                    done.set_exception(exc)
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(rid)
        if target is None:
            return
        loop, out_q = target
        try:
            loop.call_soon_threadsafe(out_q.put_nowait, item)
        except RuntimeError:  # the caller's loop has closed
            pass


class LLM:
    """Offline batch generation in the shape vLLM users know."""

    def __init__(self, model: str | Path | None = None, *, dtype: str | torch.dtype = "auto", **options: Any) -> None:
        """`options` are EngineConfig's and ParallelConfig's fields by name (max_model_len,
        num_kv_blocks, device, attention_shards, expert_groups, ...), as vLLM's LLM takes them."""
        self.core = _build_core(model, dtype, *configs_from_kwargs(**options))
        self.tokenizer = self.core.tokenizer

    def generate(
        self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Prompts are strings or lists of token ids; a single prompt may be passed bare."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError("sampling_params: need one per prompt or a single one")
        reqs = [self.core.make_request(p, sp) for p, sp in zip(prompts, params)]
        for r in reqs:
            self.core.add(r)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(reqs), desc="Generating", disable=not use_tqdm)
        try:
            while self.core.has_work():
                for out in self.core.step(final_only=True):
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            for r in reqs:  # on an error, leave nothing behind in the engine
                self.core.abort(r.seq.request_id)
        return [done[r.seq.request_id] for r in reqs]

    def chat(
        self, messages: Messages | list[Messages], sampling_params: SamplingParams | None = None,
        enable_thinking: bool = True, use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Qwen3's chat template (thinking on by default), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [render_chat(self.tokenizer, m, enable_thinking=enable_thinking) for m in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def expert_usage(self) -> torch.Tensor:
        return self.core.expert_usage().clone()

    @property
    def model_config(self) -> ModelConfig:
        """The checkpoint's config (its `moe_layers` index expert_usage()), as Engine's."""
        return self.core.model_config

    @property
    def model_path(self) -> Path:
        return self.core.model_path

    def replan(self, placement: Any) -> dict:
        """A new expert placement for the expert-parallel instance (see RayExecutor.replan)."""
        return self.core.replan(placement)

    def shutdown(self) -> None:
        """Frees the model and KV cache, and stops the instance's actors if it has any."""
        if self.core is not None:
            self.core.shutdown()
            self.core = None  # type: ignore[assignment]
