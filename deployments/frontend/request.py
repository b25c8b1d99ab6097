"""The one form a request takes in the front end, whichever protocol brought it: chat messages
(rendered by Qwen3's template) or a raw prompt (text or token ids), the tools offered, the mode if
the client chose one, the sampling fields it set, its output constraint, and how many choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.config import StructuredOutput
from deployments.frontend.sampling import SamplingFields


@dataclass
class FrontRequest:
    route: str                  # the metrics' name of the endpoint: chat, completions, responses, grpc_chat, ...
    prompt_param: str           # the field that carries the input: errors about its length name it
    messages: list[dict[str, Any]] | None = None  # chat input, in the template's shape
    prompt: str | list[int] | None = None         # or a raw prompt
    tools: list[dict[str, Any]] | None = None     # chat's shape: {"type": "function", "function": {...}}
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    thinking: bool | None = None  # chat: the client's explicit switch (None: /think, /no_think or the default)
    sampling: SamplingFields = field(default_factory=SamplingFields)
    constraint: StructuredOutput | None = None    # applies after </think> when the request thinks
    n: int = 1
    request_id: str | None = None

    @property
    def raw(self) -> bool:
        """A raw prompt: no template, and the output is neither split nor parsed for tool calls."""
        return self.messages is None
