"""AppConfig: the one schema that `q3serve up --config x.yaml`, `serve run` of
`deployments.app:app_builder` and the Helm chart's serveConfigV2 all load. Unknown keys and bad
values are rejected with pydantic's message, which names the key's path."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve.config import DEFAULT_METRICS_INTERVAL_S

from cluster.config import EngineConfig, ParallelConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AutoscalingConfig(_Strict):
    """Serve's replica autoscaling for one pool (see Serve's `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    # Serve averages replica metrics pushed every DEFAULT_METRICS_INTERVAL_S (10 s; metrics_interval_s
    # is deprecated as a setting) and warns, "an exception in a future release", for a window not
    # longer than that: Serve's own bound, read from Serve.
    look_back_period_s: float = Field(30.0, gt=DEFAULT_METRICS_INTERVAL_S)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class SamplingDefaults(_Strict):
    """Defaults for the sampling fields a request leaves unset, over those of the model's
    generation_config.json (Qwen3's: 0.6 / 0.95 / 20 for thinking; its docs give 0.7 / 0.8 / 20
    for non-thinking). None keeps the model's value, then the OpenAI API's (1.0, 1.0, off, off).
    A mode's defaults are those of the pool that serves it (thinking, fast), also when a request
    spills over to the other pool."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)


def _field_names(config: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(config))


ENGINE_FIELDS, PARALLEL_FIELDS = _field_names(EngineConfig), _field_names(ParallelConfig)
_KV_GB_DEFAULT = EngineConfig.__dataclass_fields__["kv_cache_memory_gb"].default  # "not set", for one check


def nest(pool: dict[str, Any]) -> dict[str, Any]:
    """A pool block with its engine and layout fields in their blocks. The flat spelling of
    0.1 (`thinking: {max_num_seqs: 64, attention_shards: 2}`) still loads: each such key moves
    to `engine.` or `parallel.` (a key given both ways is refused, naming it)."""
    out = dict(pool)
    for block, names in (("engine", ENGINE_FIELDS), ("parallel", PARALLEL_FIELDS)):
        flat = {k: out.pop(k) for k in list(out) if k in names}
        if not flat:
            continue
        nested = out.get(block)
        nested = dict(nested) if isinstance(nested, dict) else {}
        both = sorted(set(flat) & set(nested))
        if both:
            raise ValueError(f"{both[0]}: given both at the pool's level and in its {block} block; give it once, "
                             f"as {block}.{both[0]}")
        out[block] = {**nested, **flat}
    return out


class PoolConfig(_Strict):
    """One pool: an Engine per replica (its `engine` limits and its instance's `parallel`
    layout, the cluster's own config types with their one set of defaults), the pool's request
    limits, its replicas' CPU and health settings, and its autoscaling."""

    enabled: bool = True
    engine: EngineConfig = Field(default_factory=EngineConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    dtype: str = "auto"  # the serving dtype of the weights; "auto": the checkpoint's
    default_max_tokens: int = Field(1024, ge=1)
    max_tokens_limit: int = Field(8192, ge=1)
    default_thinking_budget: int | None = Field(None, ge=0)
    max_thinking_budget: int | None = Field(None, ge=0)
    cpu_threads: int | None = Field(None, ge=1)  # intra-op threads per replica (and its Ray CPUs); None: 1, or sized by `q3serve up`
    cpu_priority: Literal["normal", "low"] = "normal"  # "low": on a shared CPU host, runs on what the other pool leaves
    stream_interval: int = Field(1, ge=1)  # vLLM's: after the first chunk, at least this many tokens a chunk
    # ...or fewer, once the chunk's oldest token has waited this long: smooth streams while steps are
    # quick (a reader never sees 16 tokens land at once after a pause), few messages when they are slow.
    stream_max_delay_ms: float | None = Field(50.0, ge=0)
    # ...and only while a replica streams at least this many requests (0: always): under load fewer
    # messages, each carrying more tokens; with room, every token as it comes.
    stream_interval_min_streams: int = Field(0, ge=0)
    # None: max_num_seqs x attention_shards, what one replica's instance runs at once (Serve's own
    # default of 5 would starve the batch, and a fixed 32 capped a 256-sequence replica at 32).
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    health_check_period_s: float = Field(2.0, gt=0)    # how soon Serve sees a failed replica
    health_check_timeout_s: float = Field(15.0, gt=0)
    # A leaving replica (scale-down, redeploy, shutdown) stops taking requests and gets this long
    # to finish the ones it has; what is left then ends with a retriable error.
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)
    sampling_defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)

    @model_validator(mode="before")
    @classmethod
    def _nested(cls, data: Any) -> Any:
        return nest(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _device_memory(self) -> "PoolConfig":
        e = self.engine
        if e.gpu_memory_utilization is not None and self.parallel.device != "cuda":
            raise ValueError("gpu_memory_utilization: sizes the KV cache on CUDA devices; on the CPU set kv_cache_memory_gb")
        if e.gpu_memory_utilization is not None and e.kv_cache_memory_gb != _KV_GB_DEFAULT:
            raise ValueError("kv_cache_memory_gb: not used when gpu_memory_utilization sizes the KV cache; give one of them")
        return self

    @model_validator(mode="after")
    def _graphs(self) -> "PoolConfig":
        self.engine.graphs_on(self.parallel)
        return self

    @model_validator(mode="after")
    def _placement(self) -> "PoolConfig":
        if self.parallel.placement != "contiguous" and self.parallel.expert_groups < 2:
            raise ValueError("placement: a placement map spreads experts over expert groups; this pool has one")
        return self

    @property
    def ongoing_limit(self) -> int:
        """Requests one replica takes at once: `max_ongoing_requests`, else its instance's batch."""
        return self.max_ongoing_requests or self.engine.max_num_seqs * self.parallel.attention_shards

    @property
    def replica_cpus(self) -> int:
        """The replica's threads and Ray CPUs: `cpu_threads`, 1 where unset."""
        return self.cpu_threads or 1



def _thinking_pool() -> PoolConfig:
    # low priority: where both pools share a CPU host, long reasoning runs on the cycles the fast
    # pool leaves (deployments/host.py), so it does not stretch a no-think request's latency.
    # While 32 or more requests stream, a reasoning stream goes out in chunks of up to 16 tokens or
    # 100 ms (the first token at once), so the replica's, the ingress's and the proxy's per-chunk work
    # is a fraction; below 32, every token as it comes. Against a 50 ms bound at every load, over three
    # alternating pairs on 2 cores (benchmarks/results/saturation_ttft.json): chat at 4 req/s ITL p50
    # 13-19 ms instead of 56-62, at concurrency 64 +19% tokens/s and a lower TTFT p99, ITL p50 ~150 ms
    # instead of ~100 (vLLM's in benchmarks/results/serving_vs_vllm.json: 274-409).
    return PoolConfig(engine=EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096), default_max_tokens=4096,
                      max_tokens_limit=32768, cpu_priority="low", stream_interval=16, stream_max_delay_ms=100,
                      stream_interval_min_streams=32)


def _fast_pool() -> PoolConfig:
    # 64 sequences: on a CPU a decode step of 64 costs well under twice one of 32 (the lm_head and
    # the experts' weights are read once for the batch), so the queue, not the batch, made TTFT: with
    # 32, vLLM's client at concurrency 64 on completions saw TTFT p99 9.9 s and 447 tok/s; with 64,
    # 0.78-0.99 s and 461-639 tok/s over four rounds on 2 cores (benchmarks/results/serving_vs_vllm.json).
    # max_num_batched_tokens 4096 (one prefill step for 64 such prompts) gave no gain there, 1024
    # (shorter prefill steps while a burst arrives) was worse (benchmarks/results/saturation_ttft.json).
    # Tokens in twos (or after 100 ms) while 32 or more requests stream: at concurrency 64 the
    # ingress and proxy handle half the messages, +21-24% tokens/s and a lower TTFT p99 in both
    # alternating pairs (benchmarks/results/saturation_ttft.json); below 32, every token at once.
    return PoolConfig(engine=EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048), default_max_tokens=512,
                      max_tokens_limit=4096, max_thinking_budget=0, stream_interval=2, stream_max_delay_ms=100,
                      stream_interval_min_streams=32,
                      sampling_defaults=SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20))  # Qwen3's non-thinking


class RouterConfig(_Strict):
    default_thinking: bool = True    # Qwen3's default when a request says nothing
    spill_over: bool = True          # serve from the other pool when the chosen one cannot
    health_timeout_s: float = Field(5.0, gt=0)
    # a request whose replica fails before its first token is tried again on the same pool this
    # many times (Serve may pick the broken replica until its health check fails), then elsewhere
    retries_per_pool: int = Field(1, ge=0)


class LimitsConfig(_Strict):
    """Request limits applied by the router before any pool is involved."""

    max_prompt_tokens: int | None = Field(None, ge=1)     # None: the pool's context length
    max_request_bytes: int = Field(1 << 20, ge=1024)     # HTTP body size
    max_batch_prompts: int = Field(64, ge=1)             # prompts in one /v1/completions request


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


class AppConfig(_Strict):
    model: str | None = None                      # checkpoint directory; None = the embedded model
    served_model_name: str = "qwen3-moe"
    thinking: PoolConfig = Field(default_factory=_thinking_pool)
    fast: PoolConfig = Field(default_factory=_fast_pool)
    router: RouterConfig = Field(default_factory=RouterConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    api_keys: list[str] = Field(default_factory=list)  # also from $Q3SERVE_API_KEYS (comma-separated)
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=1, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _over_presets(cls, data: Any) -> Any:
        """A pool block sets fields over its pool's preset (nested blocks too), as a YAML user
        expects: `thinking: {max_num_seqs: 16}` keeps the thinking preset's other values."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, preset in (("thinking", _thinking_pool), ("fast", _fast_pool)):
            if isinstance(data.get(name), dict):
                data[name] = _merge(preset().model_dump(exclude_defaults=True), nest(data[name]))
        return data

    @model_validator(mode="after")
    def _a_pool(self) -> "AppConfig":
        if not (self.thinking.enabled or self.fast.enabled):
            raise ValueError("thinking.enabled / fast.enabled: at least one pool must be enabled")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "AppConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)

    def pools(self) -> dict[str, PoolConfig]:
        return {name: pool for name, pool in (("thinking", self.thinking), ("fast", self.fast)) if pool.enabled}
