"""Executes one Qwen3(-MoE) model instance: tensors, actors and collectives, not HTTP. These are
the public names: what `deployments/` (and an offline user) needs of the cluster."""

from cluster.config import EngineConfig, ModelConfig, ParallelConfig, RequestError, SamplingParams
from cluster.engine.core import RequestOutput
from cluster.engine.engine import LLM, Engine, EngineDeadError
from cluster.engine.tokenizer import STOP_THINKING, THINK_END, THINK_START, load_tokenizer, render_chat
from cluster.model.expert_usage import ExpertUsage, model_identity, most_used
from cluster.model.prune import prune_checkpoint
from cluster.parallel.placement import ExpertPlacement, contiguous, load_balanced, load_report

__all__ = [
    "LLM", "Engine", "EngineDeadError", "EngineConfig", "ModelConfig", "ParallelConfig", "RequestError",
    "RequestOutput", "SamplingParams", "STOP_THINKING", "THINK_END", "THINK_START", "load_tokenizer", "render_chat",
    "ExpertUsage", "model_identity", "most_used", "prune_checkpoint", "ExpertPlacement", "contiguous",
    "load_balanced", "load_report",
]
