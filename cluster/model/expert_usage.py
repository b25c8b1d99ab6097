"""Per-layer expert usage as a file: tokens routed to each expert and their summed routing weight,
collected over calibration traffic or read from a running pool, with the identity of the model
they were measured on. Pruning (which experts to keep) and load-balanced placement (where to put
them) are both computed from it, so a file measured on another checkpoint is refused."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from cluster.config import ModelConfig

By = Literal["frequency", "weight"]
FORMAT = "q3serve.expert_usage.v1"


def model_identity(path: str | Path) -> dict[str, str]:
    """What identifies a checkpoint for its expert usage: its config, and its safetensors headers
    plus the router gates' bytes hashed (the gates decide the routing; they are a small share of
    the checkpoint, so no expert weight is read)."""
    from cluster.model.checkpoint import read_tensor, tensor_index

    path = Path(path)
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            digest.update(f.name.encode() + fh.read(size))
    for name, entry in sorted(tensor_index(path).items()):
        if name.endswith(".mlp.gate.weight"):
            with open(entry.file, "rb") as fh:
                digest.update(read_tensor(fh, entry).view(-1).view(torch.uint8).numpy().tobytes())
    return {
        "path": str(path.resolve()),
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "weights_sha256": digest.hexdigest(),
    }


@dataclass
class ExpertUsage:
    """`tokens[i][e]` / `weight[i][e]`: usage of expert e in MoE layer `moe_layers[i]`."""

    model: dict[str, str]
    moe_layers: list[int]
    num_experts: int
    top_k: int
    tokens: list[list[float]]
    weight: list[list[float]]
    source: str = ""
    format: str = field(default=FORMAT)

    @classmethod
    def from_tensor(cls, usage: torch.Tensor, cfg: ModelConfig, model: dict[str, str], source: str) -> "ExpertUsage":
        """From an engine's `expert_usage()` ([2, layers, experts]); dense layers are left out."""
        layers = list(cfg.moe_layers)
        return cls(model=model, moe_layers=layers, num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                   tokens=usage[0, layers].tolist(), weight=usage[1, layers].tolist(), source=source)

    def minus(self, before: "ExpertUsage") -> "ExpertUsage":
        """The usage between two readings of the same counters."""
        self._check_same_shape(before)
        sub = lambda a, b: [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]  # noqa: E731
        return ExpertUsage(self.model, self.moe_layers, self.num_experts, self.top_k, sub(self.tokens, before.tokens),
                           sub(self.weight, before.weight), self.source)

    def plus(self, other: "ExpertUsage", source: str | None = None) -> "ExpertUsage":
        """Two sets of counters of the same checkpoint added (a pool's replicas together)."""
        self._check_same_shape(other)
        if other.model != self.model:
            raise ValueError("usage: the two readings are of different checkpoints")
        add = lambda a, b: [[x + y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]  # noqa: E731
        return ExpertUsage(self.model, self.moe_layers, self.num_experts, self.top_k, add(self.tokens, other.tokens),
                           add(self.weight, other.weight), self.source if source is None else source)

    def _check_same_shape(self, other: "ExpertUsage") -> None:
        if (other.moe_layers, other.num_experts) != (self.moe_layers, self.num_experts):
            raise ValueError("usage: the two readings are of different models")

    def scores(self, by: By) -> torch.Tensor:
        """[moe layers, experts] by routed-token frequency or by summed routing weight."""
        if by not in ("frequency", "weight"):
            raise ValueError(f"by: {by!r} is neither 'frequency' nor 'weight'")
        return torch.tensor(self.tokens if by == "frequency" else self.weight, dtype=torch.float64)

    def check_model(self, path: str | Path) -> None:
        """Refuses usage measured on another checkpoint (by config, weight headers and router gates)."""
        ident = model_identity(path)
        for key in ("config_sha256", "weights_sha256"):
            if self.model.get(key) != ident[key]:
                raise ValueError(f"usage: measured on {self.model.get('path')}, not on {ident['path']} ({key} differs)")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ExpertUsage":
        raw = json.loads(Path(path).read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path}: not an expert usage file ({FORMAT})")
        usage = cls(**raw)
        shape = (len(usage.moe_layers), usage.num_experts)
        for name in ("tokens", "weight"):
            got = getattr(usage, name)
            if (len(got), len(got[0]) if got else usage.num_experts) != shape:
                raise ValueError(f"{path}: {name} is not [{shape[0]} layers x {shape[1]} experts]")
        return usage


def most_used(usage: ExpertUsage, keep: int, by: By) -> dict[int, list[int]]:
    """Per MoE layer, the `keep` experts with the highest score, in ascending id order (ties go to
    the lower id, so the choice is deterministic)."""
    if not usage.top_k <= keep <= usage.num_experts:
        raise ValueError(f"keep: {keep} experts per layer; it must be between top-k ({usage.top_k}) "
                         f"and num_experts ({usage.num_experts})")
    scores = usage.scores(by)
    out = {}
    for i, layer in enumerate(usage.moe_layers):
        order = sorted(range(usage.num_experts), key=lambda e: (-scores[i, e].item(), e))
        out[layer] = sorted(order[:keep])
    return out
