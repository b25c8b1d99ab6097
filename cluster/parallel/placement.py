"""Where experts live: a map from every (layer, logical expert) to the expert groups holding a
copy, and the Ray placement group that pins an instance's actors.

Contiguous placement splits experts 0..N-1 into E near-equal runs. Load-balanced placement
follows DeepSeek EPLB's global policy: give R redundant slots to the experts with the highest
load per copy, then pack the copies onto groups so that per-group load is even (heaviest
first, onto the least-loaded group with a free slot). Tokens of a replicated expert are split
among its copies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "q3serve.expert_placement.v1"


@dataclass(frozen=True)
class ExpertPlacement:
    """`slots[layer][group]` lists the logical experts held by that group for that layer, in
    local-slot order; an expert may appear in several groups (redundant copies)."""

    num_experts: int
    num_groups: int
    slots: tuple[tuple[tuple[int, ...], ...], ...]  # [layer][group] -> logical expert ids

    def __post_init__(self) -> None:
        for layer, groups in enumerate(self.slots):
            if len(groups) != self.num_groups:
                raise ValueError(f"placement: layer {layer} has {len(groups)} groups, expected {self.num_groups}")
            held = {e for g in groups for e in g}
            if held != set(range(self.num_experts)):
                missing = sorted(set(range(self.num_experts)) - held)
                raise ValueError(f"placement: layer {layer} holds no copy of experts {missing}")

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    def experts_of(self, group: int) -> list[tuple[int, ...]]:
        """Per layer, the logical experts a group loads, in its local-slot order."""
        return [layer[group] for layer in self.slots]

    def replicas(self, layer: int) -> list[list[tuple[int, int]]]:
        """For each logical expert, its copies as (group, local slot)."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts)]
        for g, experts in enumerate(self.slots[layer]):
            for slot, e in enumerate(experts):
                out[e].append((g, slot))
        return out

    def routing_tables(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tensors for the dispatcher: for logical expert e, copies `num_copies[e]`, and for copy
        c < num_copies[e], `group[e, c]` and `slot[e, c]`."""
        reps = self.replicas(layer)
        width = max(len(r) for r in reps)
        group = torch.zeros(self.num_experts, width, dtype=torch.long)
        slot = torch.zeros(self.num_experts, width, dtype=torch.long)
        for e, copies in enumerate(reps):
            for c in range(width):
                g, s = copies[c % len(copies)]
                group[e, c], slot[e, c] = g, s
        return torch.tensor([len(r) for r in reps]), group, slot


    def group_loads(self, counts: torch.Tensor) -> torch.Tensor:
        """[layers, groups]: the tokens each group would compute for per-expert `counts`
        [layers, experts], a replicated expert's tokens split evenly over its copies."""
        out = torch.zeros(self.num_layers, self.num_groups, dtype=torch.float64)
        for layer in range(self.num_layers):
            reps = self.replicas(layer)
            for e, copies in enumerate(reps):
                for g, _ in copies:
                    out[layer, g] += counts[layer, e].item() / len(copies)
        return out

    def to_dict(self) -> dict:
        return {"format": FORMAT, "num_experts": self.num_experts, "num_groups": self.num_groups,
                "slots": [[list(g) for g in layer] for layer in self.slots]}

    @classmethod
    def from_dict(cls, raw: dict) -> "ExpertPlacement":
        if raw.get("format") != FORMAT:
            raise ValueError(f"placement: not an expert placement map ({FORMAT})")
        return cls(int(raw["num_experts"]), int(raw["num_groups"]),
                   tuple(tuple(tuple(int(e) for e in g) for g in layer) for layer in raw["slots"]))

    def save(self, path: str | Path, **extra: object) -> Path:
        """The map as JSON; `extra` (e.g. the load report) is stored beside it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.to_dict(), **extra}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ExpertPlacement":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"placement: cannot read the map {path}: {exc}") from None
        return cls.from_dict(raw)


def load_report(placement: ExpertPlacement, counts: torch.Tensor) -> dict:
    """How even a map is on measured counts [layers, experts]: per layer the largest group's
    tokens (each layer's exchange waits for its slowest group), summed over layers, and the mean
    ratio of the largest group to the average group (1.0 = perfectly even)."""
    loads = placement.group_loads(counts)
    peak = loads.max(dim=1).values
    mean = loads.mean(dim=1).clamp_min(1e-9)
    return {"max_group_tokens_per_layer": peak.tolist(), "max_group_tokens_sum": float(peak.sum()),
            "imbalance_mean": float((peak / mean).mean())}


def contiguous(num_experts: int, num_groups: int, num_layers: int) -> ExpertPlacement:
    """Experts split into runs: group g holds [g*N/E, (g+1)*N/E) (sizes differ by at most 1)."""
    if not 1 <= num_groups <= num_experts:
        raise ValueError(f"expert_groups: {num_groups} must be between 1 and num_experts={num_experts}")
    bounds = [round(g * num_experts / num_groups) for g in range(num_groups + 1)]
    layer = tuple(tuple(range(bounds[g], bounds[g + 1])) for g in range(num_groups))
    return ExpertPlacement(num_experts, num_groups, (layer,) * num_layers)


def load_balanced(counts: torch.Tensor, num_groups: int, redundant: int = 0) -> ExpertPlacement:
    """EPLB-style placement from measured per-expert token counts [layers, experts]."""
    num_layers, num_experts = counts.shape
    total = num_experts + redundant
    if total % num_groups:
        raise ValueError(f"redundant: num_experts + redundant ({total}) must be divisible by expert_groups ({num_groups})")
    if redundant > num_experts * (num_groups - 1):
        raise ValueError(f"redundant: at most {num_experts * (num_groups - 1)} copies fit, one per expert and group")
    per_group = total // num_groups
    layers = []
    for layer in range(num_layers):
        load = counts[layer].double() + 1e-9  # unseen experts still get a slot
        copies = [1] * num_experts
        for _ in range(redundant):  # replicate where load per copy is highest, at most a copy per group
            e = max((i for i in range(num_experts) if copies[i] < num_groups), key=lambda i: load[i].item() / copies[i])
            copies[e] += 1
        items = sorted(
            ((load[e].item() / copies[e], e) for e in range(num_experts) for _ in range(copies[e])), reverse=True
        )
        groups: list[list[int]] = [[] for _ in range(num_groups)]
        group_load = [0.0] * num_groups
        for w, e in items:
            choices = [g for g in range(num_groups) if len(groups[g]) < per_group and e not in groups[g]]
            if not choices:  # the free slots are on groups that hold e already: take any free slot
                choices = [g for g in range(num_groups) if len(groups[g]) < per_group]
            g = min(choices, key=lambda i: group_load[i])
            groups[g].append(e)
            group_load[g] += w
        layers.append(tuple(tuple(sorted(g)) for g in groups))
    return ExpertPlacement(num_experts, num_groups, tuple(layers))
