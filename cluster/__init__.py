"""Executes one Qwen3(-MoE) model instance: tensors, actors and collectives, not HTTP. These are
the public names: what `deployments/` (and an offline user) needs of the cluster.

Loaded lazily (PEP 562): a name's module is imported on first use, so that importing a config
type or SamplingParams (the CLI, the app's config, a client) does not import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_MODULES = {
    "cluster.config": ("EngineConfig", "ModelConfig", "ParallelConfig", "RequestError", "SamplingParams"),
    "cluster.engine.core": ("RequestOutput",),
    "cluster.engine.engine": ("LLM", "Engine", "EngineDeadError"),
    "cluster.engine.tokenizer": ("STOP_THINKING", "THINK_END", "THINK_START", "load_tokenizer", "render_chat",
                                 "tokenizer_dir"),
    "cluster.model.expert_usage": ("ExpertUsage", "model_identity", "most_used"),
    "cluster.model.prune": ("prune_checkpoint",),
    "cluster.parallel.placement": ("ExpertPlacement", "contiguous", "load_balanced", "load_report"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "LLM", "Engine", "EngineDeadError", "EngineConfig", "ModelConfig", "ParallelConfig", "RequestError",
    "RequestOutput", "SamplingParams", "STOP_THINKING", "THINK_END", "THINK_START", "load_tokenizer", "render_chat",
    "tokenizer_dir", "ExpertUsage", "model_identity", "most_used", "prune_checkpoint", "ExpertPlacement", "contiguous",
    "load_balanced", "load_report",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'cluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from cluster.config import EngineConfig, ModelConfig, ParallelConfig, RequestError, SamplingParams
    from cluster.engine.core import RequestOutput
    from cluster.engine.engine import LLM, Engine, EngineDeadError
    from cluster.engine.tokenizer import (STOP_THINKING, THINK_END, THINK_START, load_tokenizer, render_chat,
                                          tokenizer_dir)
    from cluster.model.expert_usage import ExpertUsage, model_identity, most_used
    from cluster.model.prune import prune_checkpoint
    from cluster.parallel.placement import ExpertPlacement, contiguous, load_balanced, load_report
