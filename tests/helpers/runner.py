"""What a test reads of a ModelRunner's step that the runner does not keep: the logits it sampled
from, taken by wrapping the runner's own calls on that one instance."""

from __future__ import annotations

import torch

from cluster.engine.plan import Sampled, StepPlan
from cluster.model.runner import ModelRunner


class LogitsTap:
    """`last`: the logits the runner's last step sampled from ([sampled rows, vocab], the tensor
    its sampler got, eager or static path), or None after a step that sampled nothing. Wraps the
    instance's `execute` (which clears it) and `_sample` (which every sampled token goes through,
    and which sets it)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.last: torch.Tensor | None = None
        execute, sample = runner.execute, runner._sample

        def tapped_execute(plan: StepPlan) -> list[Sampled]:
            self.last = None
            return execute(plan)

        def tapped_sample(plan: StepPlan, logits: torch.Tensor) -> dict[str, Sampled]:
            self.last = logits
            return sample(plan, logits)

        runner.execute, runner._sample = tapped_execute, tapped_sample  # type: ignore[method-assign]
