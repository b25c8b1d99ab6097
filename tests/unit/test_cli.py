"""The README's first command: `q3serve generate` on the embedded default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cluster.config import ModelConfig


def test_generate_on_default_model(tmp_path: Path) -> None:
    env = {**os.environ, "Q3SERVE_CACHE": str(tmp_path)}
    cmd = [sys.executable, "-m", "deployments.cli", "generate", "Hello", "--max-tokens", "5"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "[5 tokens, finish_reason=length]" in run.stderr
    model_dir = tmp_path / "models" / "q3serve-random-moe-v1"
    cfg = ModelConfig.from_pretrained(model_dir)
    assert cfg.architecture == "Qwen3MoeForCausalLM" and cfg.vocab_size == 151936
    # Deterministic: a second generation into another cache gives the same bytes.
    other = tmp_path / "again"
    from cluster import default_model

    os.environ["Q3SERVE_CACHE"] = str(other)
    try:
        again = default_model.default_model_path()
    finally:
        del os.environ["Q3SERVE_CACHE"]
    assert (again / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert json.loads((again / "config.json").read_text()) == json.loads((model_dir / "config.json").read_text())


def test_cli_reports_bad_input(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "deployments.cli", "generate", "Hi", "--model", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "config.json" in run.stderr
