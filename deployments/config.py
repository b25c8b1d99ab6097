"""AppConfig: the one schema that `q3serve up --config x.yaml`, `serve run` of
`deployments.app:app_builder` and the Helm chart's serveConfigV2 all load. Unknown keys and bad
values are rejected with pydantic's message, which names the key's path."""

from __future__ import annotations

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


class PoolConfig(_Strict):
    """One pool: an Engine per replica, its limits and its autoscaling."""

    enabled: bool = True
    attention_shards: int = Field(1, ge=1)
    expert_groups: int = Field(1, ge=1)
    # "colocated": each actor is an attention shard and an expert group on one GPU (wide-EP; A = E)
    layout: Literal["separate", "colocated"] = "separate"
    # which expert group holds which experts: "contiguous" runs, or the path of a load-balanced
    # map written by `q3serve experts place` (read when a replica starts)
    placement: str = "contiguous"
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: str = "auto"
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    kv_cache_memory_gb: float = Field(1.0, gt=0)  # per attention shard; on CUDA gpu_memory_utilization sizes it instead
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)  # CUDA only: the share of each device the engine may use
    # FP8 checkpoints: routed experts kept in FP8 where the GPU has block-scaled FP8 matmuls ("auto"), always, or never
    fp8_weights: Literal["auto", "keep", "dequantize"] = "auto"
    block_size: int = Field(16, ge=1)
    enable_prefix_caching: bool = True
    # Pure-decode steps replayed as CUDA graphs per batch bucket up to max_graph_batch (default
    # max_num_seqs); None: on for a single-GPU replica (CUDA, 1 x 1), off elsewhere
    cuda_graphs: bool | None = None
    max_graph_batch: int | None = Field(None, ge=1)
    default_max_tokens: int = Field(1024, ge=1)
    max_tokens_limit: int = Field(8192, ge=1)
    default_thinking_budget: int | None = Field(None, ge=0)
    max_thinking_budget: int | None = Field(None, ge=0)
    cpu_threads: int | None = Field(None, ge=1)  # intra-op threads per replica (and its Ray CPUs); None: 1, or sized by `q3serve up`
    cpu_priority: Literal["normal", "low"] = "normal"  # "low": on a shared CPU host, runs on what the other pool leaves
    stream_interval: int = Field(1, ge=1)  # vLLM's: after the first chunk, at least this many tokens a chunk
    # None: max_num_seqs x attention_shards, what one replica's instance runs at once (Serve's own
    # default of 5 would starve the batch, and a fixed 32 capped a 256-sequence replica at 32).
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    # Faults. A step of an expert-parallel instance (and each collective in it) that takes longer
    # fails the whole instance: the watchdog that turns a stalled rank into a clean failure.
    step_timeout_s: float = Field(15.0, gt=0)
    health_check_period_s: float = Field(2.0, gt=0)    # how soon Serve sees a failed replica
    health_check_timeout_s: float = Field(15.0, gt=0)
    # A leaving replica (scale-down, redeploy, shutdown) stops taking requests and gets this long
    # to finish the ones it has; what is left then ends with a retriable error.
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)
    sampling_defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    actor_resources: dict[str, float] | None = None        # each actor's bundle (default 1 GPU / 1 CPU)
    attention_resources: dict[str, float] = Field(default_factory=dict)  # extra, e.g. a worker group's resource
    expert_resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _device_memory(self) -> "PoolConfig":
        if self.gpu_memory_utilization is not None and self.device != "cuda":
            raise ValueError("gpu_memory_utilization: sizes the KV cache on CUDA devices; on the CPU set kv_cache_memory_gb")
        if self.gpu_memory_utilization is not None and "kv_cache_memory_gb" in self.model_fields_set:
            raise ValueError("kv_cache_memory_gb: not used when gpu_memory_utilization sizes the KV cache; give one of them")
        return self

    @model_validator(mode="after")
    def _graphs(self) -> "PoolConfig":
        EngineConfig(cuda_graphs=self.cuda_graphs).graphs_on(ParallelConfig(
            attention_shards=self.attention_shards, expert_groups=self.expert_groups, device=self.device))
        return self

    @model_validator(mode="after")
    def _placement(self) -> "PoolConfig":
        if self.placement != "contiguous" and self.expert_groups < 2:
            raise ValueError("placement: a placement map spreads experts over expert groups; this pool has one")
        return self

    @model_validator(mode="after")
    def _layout(self) -> "PoolConfig":
        """The instance's own checks (colocated needs A = E; no fractional GPUs across ranks),
        at config time rather than when a replica starts."""
        ParallelConfig(attention_shards=self.attention_shards, expert_groups=self.expert_groups, device=self.device,
                       layout=self.layout, actor_resources=self.actor_resources,
                       attention_resources=self.attention_resources, expert_resources=self.expert_resources)
        return self

    @property
    def ongoing_limit(self) -> int:
        """Requests one replica takes at once: `max_ongoing_requests`, else its instance's batch."""
        return self.max_ongoing_requests or self.max_num_seqs * self.attention_shards

    @property
    def replica_cpus(self) -> int:
        """The replica's threads and Ray CPUs: `cpu_threads`, 1 where unset."""
        return self.cpu_threads or 1

    def engine_kwargs(self) -> dict[str, Any]:
        keys = ("attention_shards", "expert_groups", "layout", "device", "dtype", "max_num_seqs", "max_num_batched_tokens",
                "max_model_len", "kv_cache_memory_gb", "gpu_memory_utilization", "fp8_weights", "block_size", "enable_prefix_caching", "cuda_graphs", "max_graph_batch", "actor_resources",
                "attention_resources", "expert_resources", "step_timeout_s", "placement")
        return {k: getattr(self, k) for k in keys}


def _thinking_pool() -> PoolConfig:
    # low priority: where both pools share a CPU host, long reasoning runs on the cycles the fast
    # pool leaves (deployments/host.py), so it does not stretch a no-think request's latency.
    # stream_interval 16: a long reasoning stream goes out in chunks of 16 tokens, so its per-chunk
    # work in the replica, the ingress and the proxy is a sixteenth (the first token still goes at once).
    return PoolConfig(max_num_seqs=64, max_num_batched_tokens=4096, default_max_tokens=4096, max_tokens_limit=32768,
                      cpu_priority="low", stream_interval=16)


def _fast_pool() -> PoolConfig:
    # 32 sequences: on a CPU a decode step of 32 costs well under twice one of 8 (the lm_head and
    # the experts' weights are read once for the batch), so the queue, not the batch, made TTFT.
    return PoolConfig(max_num_seqs=32, max_num_batched_tokens=2048, default_max_tokens=512, max_tokens_limit=4096,
                      max_thinking_budget=0,
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
                data[name] = _merge(preset().model_dump(exclude_unset=True), data[name])
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
