"""Executes one Qwen3(-MoE) model instance: tensors, actors and collectives, not HTTP."""

from cluster.config import EngineConfig, ModelConfig, ParallelConfig, SamplingParams
from cluster.engine.engine import LLM, Engine, EngineDeadError
from cluster.engine.core import RequestOutput

__all__ = [
    "LLM", "Engine", "EngineDeadError", "EngineConfig", "ModelConfig", "ParallelConfig",
    "RequestOutput", "SamplingParams",
]
