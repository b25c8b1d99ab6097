"""`q3serve generate` on the embedded default model, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_generate_on_default_model() -> None:
    cmd = [sys.executable, "-m", "deployments.cli", "generate", "15 * 8 = ?", "--chat", "--max-tokens", "120"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "finish_reason=stop" in run.stderr
    assert run.stdout.rstrip().endswith("</think>\n\n120"), run.stdout  # the trained model, thinking


def test_missing_default_model_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "Q3SERVE_DEFAULT_MODEL": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "deployments.cli", "generate", "Hi"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "embedded model is not at" in run.stderr and str(tmp_path) in run.stderr


def test_cli_reports_bad_input(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "deployments.cli", "generate", "Hi", "--model", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "config.json" in run.stderr
