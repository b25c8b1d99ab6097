"""`q3serve up` serves the app, prints its URL when ready, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.serving.conftest import free_port


def test_up_serves_and_stops_on_ctrl_c(qwen_vocab_checkpoint: Path, tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "app.yaml"
    cfg.write_text(
        "served_model_name: m\n"
        "thinking: {dtype: float32, kv_cache_memory_gb: 0.05}\n"
        "fast: {dtype: float32, kv_cache_memory_gb: 0.05}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "up", "--config", str(cfg), "--model", str(qwen_vocab_checkpoint),
         "--port", str(port), "--grpc-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "q3serve is up" in line:
                break
        assert any(f"http://127.0.0.1:{port}/v1" in l for l in lines), "".join(lines)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out
    assert "stopping" in out
