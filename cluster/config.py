"""Configuration types of one model instance: the model (from HF config.json), its parallel
layout, the engine's limits, and per-request sampling parameters."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as checked_dataclass

if TYPE_CHECKING:  # torch only where a dtype is used: importing a config type must stay cheap
    import torch

SUPPORTED_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen3ForCausalLM")

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turns 'bfloat16' / 'float32' / a torch.dtype into a torch.dtype, with a clear error."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype: unknown dtype {name!r}; use one of float32, bfloat16, float16")
    return getattr(torch, _DTYPES[key])


class RequestError(ValueError):
    """A request field with a value the engine cannot serve; `param` names the field, so that the
    APIs answer HTTP 400 with it in OpenAI's `param` / gRPC INVALID_ARGUMENT. Pickles with its
    field, so it crosses Ray and Serve handles intact."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(param, message)
        self.param = param
        self.message = message

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message


class ConfigError(ValueError):
    """A checkpoint's config.json cannot be served; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a Qwen3 / Qwen3-MoE config.json that change the computation."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    # The sampling fields generation_config.json sets (Qwen3 ships temperature 0.6, top_p 0.95,
    # top_k 20): a server's defaults for requests that leave them unset, as vLLM's
    # `--generation-config auto`. `do_sample` is ignored there too.
    sampling_defaults: tuple[tuple[str, float], ...] = ()
    # Block-wise FP8 weights (Qwen's -FP8 checkpoints): the [rows, cols] of one scale's block.
    fp8_block: tuple[int, int] | None = None
    # How this engine holds an FP8 checkpoint's routed experts (not read from config.json; the
    # engine sets it from EngineConfig.fp8_weights): "auto", "keep" or "dequantize" (cluster/model/fp8.py).
    fp8_weights: str = "auto"

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Reads `config.json` (and `generation_config.json` for eos ids) from a model directory."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}")
        raw = json.loads(cfg_file.read_text())
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls.from_dict(raw, generation_config=gen)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architectures: {arch!r} is not supported; q3serve serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if raw.get("use_sliding_window"):
            raise ConfigError("use_sliding_window: sliding-window attention is not supported")
        moe = arch == "Qwen3MoeForCausalLM"
        heads = _req(raw, "num_attention_heads")
        num_experts = int(raw.get("num_experts", raw.get("num_local_experts", 0))) if moe else 0
        theta, scaling = _rope(raw)
        eos = _eos_ids(raw, generation_config or {})
        cfg = cls(
            architecture=arch,
            vocab_size=_req(raw, "vocab_size"),
            hidden_size=_req(raw, "hidden_size"),
            num_hidden_layers=_req(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or _req(raw, "hidden_size") // heads),
            intermediate_size=int(raw.get("intermediate_size") or 0),
            num_experts=num_experts,
            num_experts_per_tok=int(raw.get("num_experts_per_tok", 0)) if moe else 0,
            moe_intermediate_size=int(raw.get("moe_intermediate_size", 0)) if moe else 0,
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=int(raw.get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            attention_bias=bool(raw.get("attention_bias", False)),
            eos_token_ids=eos,
            sampling_defaults=_sampling_defaults(generation_config or {}),
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
            fp8_block=_fp8_block(raw.get("quantization_config")),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_key_value_heads: must divide num_attention_heads")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError("num_experts_per_tok: must be between 1 and num_experts")
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ConfigError("moe_intermediate_size: must be positive for a MoE model")
        if any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)) and self.intermediate_size <= 0:
            raise ConfigError("intermediate_size: dense MLP layers need a positive intermediate_size")
        if self.rope_scaling and self.rope_scaling.get("rope_type") not in ("default", "yarn", "linear"):
            raise ConfigError(f"rope_scaling.rope_type: {self.rope_scaling.get('rope_type')!r} is not supported")

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen3-MoE's rule: sparse unless listed in mlp_only_layers or off the sparse step."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = dtype.itemsize
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * elem


def _fp8_block(quant: dict[str, Any] | None) -> tuple[int, int] | None:
    """`quantization_config` as Qwen's FP8 checkpoints write it: {"quant_method": "fp8", "fmt":
    "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}. Anything else is
    refused here, naming the field, rather than loaded as garbage."""
    if not quant:
        return None
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method: {method!r} is not supported; q3serve reads "
                          "unquantized checkpoints and Qwen's block-wise FP8 ('fp8')")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"quantization_config.fmt: {quant.get('fmt')!r} is not supported; FP8 weights must be e4m3")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"quantization_config.activation_scheme: {quant.get('activation_scheme')!r} is not "
                          "supported; only 'dynamic' (no activation scales in the checkpoint)")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"quantization_config.weight_block_size: {block!r}; q3serve reads block-wise FP8 "
                          "([rows, cols], e.g. [128, 128]), not per-tensor scales")
    return block[0], block[1]


def _req(raw: dict[str, Any], key: str) -> int:
    if key not in raw:
        raise ConfigError(f"{key}: missing from config.json")
    return int(raw[key])


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Hub checkpoints write rope_theta + rope_scaling; transformers 5 writes rope_parameters."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged.pop("type")
    merged.pop("type", None)
    merged.pop("partial_rotary_factor", None)
    if merged.get("rope_type", "default") == "default":
        return theta, None
    if merged["rope_type"] == "yarn":
        merged.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 32768))
        if merged.get("factor") is None:
            merged["factor"] = raw["max_position_embeddings"] / merged["original_max_position_embeddings"]
    return theta, merged


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p")


def _sampling_defaults(gen: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    return tuple((k, gen[k]) for k in SAMPLING_DEFAULT_KEYS if isinstance(gen.get(k), (int, float)))


def _eos_ids(raw: dict[str, Any], gen: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for src in (gen.get("eos_token_id"), raw.get("eos_token_id")):
        if src is None:
            continue
        for i in src if isinstance(src, list) else [src]:
            if int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)


def field_errors(exc: ValidationError) -> str:
    """A pydantic report as one line per error that starts with the field, as the rest of the
    engine's errors do ("max_num_seqs: 0 is not valid: input should be ..."); a cross-field
    check's message already starts with its field."""
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(part) for part in err["loc"])
        lines.append(f"{loc}: {err['input']!r} is not valid: {msg[:1].lower()}{msg[1:]}" if loc else msg)
    return "; ".join(lines)


# Engine-side configs are pydantic dataclasses: unknown fields and bad values are refused where
# they are built, and a pydantic model that holds one reports them at its own path.
_CHECKED = ConfigDict(extra="forbid")
RayStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@checked_dataclass(config=_CHECKED)
class ParallelConfig:
    """How one model instance is spread: attention shards (data parallel over sequences, each
    with its sequences' KV cache) and expert groups (each a slice of every MoE layer's experts).

    Each actor gets one placement-group bundle of `actor_resources` plus the resources of its
    kind (`attention_resources` / `expert_resources`, e.g. a custom node resource), and may be
    pinned to nodes by label (`attention_labels` / `expert_labels`, Ray node labels matched by
    the bundle's label selector), e.g. to put expert groups on one GPU node pool. `placement` is "contiguous", a load-balanced
    `ExpertPlacement` built by `cluster.parallel.placement.load_balanced`, or the path of one saved
    by `q3serve experts place`.

    `layout` "separate" gives every shard and every group its own actor and bundle (A + E
    devices); "colocated" makes actor i attention shard i and expert group i at once, one bundle
    (one GPU) each, A = E: an attention shard and an expert group share a GPU as one rank,
    because NCCL refuses two ranks of one communicator on one device (so fractional-GPU bundles
    are refused in the separate layout).

    A pydantic dataclass: a bad value fails at construction with the field's name, and a
    pydantic model holding one (deployments' PoolConfig) reports it at its own path
    (`fast.parallel.device`). Per-field bounds are in the annotations; `__post_init__` checks
    what spans fields."""

    attention_shards: Annotated[int, Field(ge=1)] = 1
    expert_groups: Annotated[int, Field(ge=1)] = 1
    device: Literal["cpu", "cuda"] = "cpu"
    placement_strategy: RayStrategy = "PACK"
    actor_resources: dict[str, float] | None = None
    attention_resources: dict[str, float] = field(default_factory=dict)
    expert_resources: dict[str, float] = field(default_factory=dict)
    attention_labels: dict[str, str] = field(default_factory=dict)
    expert_labels: dict[str, str] = field(default_factory=dict)
    placement: Any = "contiguous"  # a name, a saved placement's path, or an ExpertPlacement
    use_ray: bool = False          # run even a 1 x 1 instance as actors
    # A step (and each collective) that takes longer fails the instance. 15 s is the served
    # watchdog: long enough for any one step, short enough that a lost actor fails fast (one
    # default, here; deployments' PoolConfig holds this config rather than restating it).
    step_timeout_s: Annotated[float, Field(gt=0)] = 15.0
    torch_threads: Annotated[int, Field(ge=1)] = 1  # intra-op threads per actor
    layout: Literal["separate", "colocated"] = "separate"  # "colocated": shard i and group i in one actor

    def __post_init__(self) -> None:
        if self.colocated and self.expert_groups != self.attention_shards:
            raise ValueError(
                f"expert_groups: the colocated layout pairs each attention shard with one expert group, "
                f"got {self.attention_shards} shards and {self.expert_groups} groups"
            )
        gpus = {b.get("GPU", 0.0) for b in self.bundles()}
        if self.device == "cuda" and not self.colocated and self.num_actors > 1 and any(0 < g < 1 for g in gpus):
            raise ValueError(
                "actor_resources: a fractional GPU would put two ranks of the instance's NCCL group on one "
                "device, which NCCL refuses; to share GPUs between attention shards and expert groups use "
                "layout='colocated'"
            )

    @property
    def in_process(self) -> bool:
        """A 1 x 1 instance not asked onto Ray: the engine's own process runs it (LocalExecutor)."""
        return self.attention_shards == 1 and self.expert_groups == 1 and not self.use_ray

    @property
    def colocated(self) -> bool:
        return self.layout == "colocated"

    @property
    def num_actors(self) -> int:
        """Actors (= ranks = bundles) of one instance."""
        return self.attention_shards if self.colocated else self.attention_shards + self.expert_groups

    def bundle(self, kind: str) -> dict[str, float]:
        """The resources of one actor of `kind` ("attention", "expert" or "colocated")."""
        base = self.actor_resources or ({"CPU": 1.0, "GPU": 1.0} if self.device == "cuda" else {"CPU": 1.0})
        extra = {"attention": self.attention_resources, "expert": self.expert_resources,
                 "colocated": {**self.expert_resources, **self.attention_resources}}[kind]
        return {**base, **extra}

    def labels(self, kind: str) -> dict[str, str]:
        return dict({"attention": self.attention_labels, "expert": self.expert_labels,
                     "colocated": {**self.expert_labels, **self.attention_labels}}[kind])

    def kinds(self) -> list[str]:
        """The kind of each rank's actor, in rank order."""
        if self.colocated:
            return ["colocated"] * self.attention_shards
        return ["attention"] * self.attention_shards + ["expert"] * self.expert_groups

    def bundles(self) -> list[dict[str, float]]:
        """One placement-group bundle per actor, in rank order."""
        return [self.bundle(k) for k in self.kinds()]


@checked_dataclass(config=_CHECKED)
class EngineConfig:
    """Limits of the scheduler and the KV pool. The KV pool is sized from `kv_cache_memory_gb`
    unless `num_kv_blocks` pins it (tests use that to force preemption) or, on CUDA,
    `gpu_memory_utilization` has it take what the device has left after the weights and a
    measured step (cluster/model/memory.py); with several attention shards, each shard gets a
    pool of that size for its own sequences. A pydantic dataclass, as ParallelConfig."""

    max_num_seqs: Annotated[int, Field(ge=1)] = 64
    max_num_batched_tokens: Annotated[int, Field(ge=1)] = 2048
    max_model_len: Annotated[int, Field(ge=1)] | None = None
    block_size: Annotated[int, Field(ge=1)] = 16
    kv_cache_memory_gb: Annotated[float, Field(gt=0)] = 1.0
    num_kv_blocks: Annotated[int, Field(ge=1)] | None = None
    # CUDA: size the KV pool from the device (vLLM's meaning)
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    # FP8 checkpoints: keep the routed experts in FP8 ("keep": half their bytes, slower steps),
    # or dequantize them on load ("dequantize", and "auto" for now: cluster/model/fp8.py says why)
    fp8_weights: Literal["auto", "keep", "dequantize"] = "auto"
    # Pure-decode steps replayed as CUDA graphs, one per batch bucket up to `max_graph_batch`
    # (default max_num_seqs); None: on for a single-GPU instance, off elsewhere (cluster/model/graphs.py)
    cuda_graphs: bool | None = None
    max_graph_batch: Annotated[int, Field(ge=1)] | None = None
    # Pure-decode steps on the static buffers without capturing them (None: where cuda_graphs is
    # on); True on the CPU runs the graphs' step eagerly, to check it against the eager path
    static_decode: bool | None = None

    def __post_init__(self) -> None:
        if self.gpu_memory_utilization is not None and self.num_kv_blocks is not None:
            raise ValueError("gpu_memory_utilization: give it or num_kv_blocks, not both")

    def graphs_on(self, parallel: "ParallelConfig") -> bool:
        """Whether this instance captures decode graphs: `cuda_graphs`, or by default where it
        can (CUDA, one process). Refused, naming the field, where it cannot: an expert-parallel
        instance's exchange reads its split sizes on the host, so it steps eagerly for now."""
        if self.cuda_graphs is None:
            return parallel.device == "cuda" and parallel.in_process
        if self.cuda_graphs and parallel.device != "cuda":
            raise ValueError(f"cuda_graphs: CUDA graphs need device 'cuda', not {parallel.device!r}")
        if self.cuda_graphs and not parallel.in_process:
            raise ValueError("cuda_graphs: an expert-parallel instance steps eagerly (its exchange sizes are read "
                             "on the host); set it for single-GPU instances only")
        return self.cuda_graphs

    def static_on(self, parallel: "ParallelConfig") -> bool:
        """Whether pure-decode steps run on static buffers: `static_decode`, else with the graphs."""
        graphs = self.graphs_on(parallel)
        if self.static_decode is None:
            return graphs
        if self.static_decode and not parallel.in_process:
            raise ValueError("static_decode: an expert-parallel instance steps eagerly; set it for single-process instances only")
        if graphs and not self.static_decode:
            raise ValueError("static_decode: CUDA graphs replay the static step; it cannot be off while cuda_graphs is on")
        return self.static_decode

    @property
    def graph_batch(self) -> int:
        """The largest captured batch: `max_graph_batch`, never beyond what a step can hold."""
        return min(self.max_graph_batch or self.max_num_seqs, self.max_num_seqs)

    def kv_blocks(self, model: ModelConfig, dtype: torch.dtype) -> int:
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        per_block = model.kv_bytes_per_token(dtype) * self.block_size
        return max(1, int(self.kv_cache_memory_gb * (1 << 30)) // per_block)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output, compiled by xgrammar in the engine (cluster/engine/structured.py).
    `kind`: "json_schema" (spec: the schema as JSON text), "json_object" (any JSON object), "regex",
    "choice" (spec: a JSON list of strings), "grammar" (xgrammar's EBNF), or "tool_call" (spec: JSON
    {"tools": [...], "choice": name or null}: one or more `<tool_call>` blocks, Qwen3's format).
    `param` is the request field that asked (errors name it); with `after_think` the constraint
    starts after the model's `</think>` (reasoning stays free, as vLLM's reasoning-aware outputs)."""

    kind: str
    spec: str = ""
    param: str = "structured_output"
    after_think: bool = False


@dataclass
class SamplingParams:
    """Per-request decoding controls, named as in vLLM. temperature 0 means greedy."""

    max_tokens: int | None = 16      # None: up to the context length (a server applies its pool's default)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    thinking_budget: int | None = None  # Qwen3: tokens allowed inside <think> before it is closed
    # OpenAI's and vLLM's meanings: presence/frequency subtract from the logits of tokens already
    # generated (once, and per occurrence); repetition divides (or multiplies, when negative) the
    # logits of tokens in the prompt or the output; logit_bias adds to given tokens' logits;
    # top_logprobs returns that many most likely tokens with their logprobs at each position.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int = 0
    # vLLM's: the logprob of every prompt token after the first (and this many alternatives);
    # such a request computes its whole prompt (no prefix-cache hit), in slices of rows.
    prompt_logprobs: int | None = None
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        try:
            self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        except (TypeError, ValueError):
            raise RequestError("logit_bias", "must map token ids to numbers") from None
        if self.top_logprobs:
            self.logprobs = True
        checks = [
            ("max_tokens", self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 0),
             "must be a non-negative integer (0: compute the prompt only)"),
            ("temperature", self.temperature >= 0 and math.isfinite(self.temperature), "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("thinking_budget", self.thinking_budget is None
             or (isinstance(self.thinking_budget, int) and self.thinking_budget >= 0), "must be a non-negative integer"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 10 and math.isfinite(self.repetition_penalty),
             "must be in (0, 10]"),
            ("logit_bias", all(-100 <= v <= 100 for v in self.logit_bias.values()), "values must be in [-100, 100]"),
            ("top_logprobs", isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None
             or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20), "must be in [0, 20]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise RequestError(name, f"{rule}, got {getattr(self, name)!r}")
        if any(not s for s in self.stop):
            raise RequestError("stop", "stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the tokens generated so far (and the prompt's, for repetition)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
