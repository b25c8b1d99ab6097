"""Session fixtures every test package may use: tiny random-weight checkpoints (built by
tests/helpers/models.py). Also sets the environment the kernels read at import."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers.models import make_checkpoint, make_qwen_vocab_checkpoint

# The Triton kernels (cluster/kernels/gpu) run in Triton's interpreter where no GPU is present; it
# is read when a kernel is defined, so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="session")
def qwen_vocab_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3's full vocabulary (so chat-template and think tokens are real ids), tiny otherwise;
    built once for the whole run (the serving tests and the engine's thinking-budget tests)."""
    return make_qwen_vocab_checkpoint(tmp_path_factory.mktemp("qwen-vocab"))
