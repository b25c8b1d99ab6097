"""`q3serve up` with no model argument serves the embedded trained model, prints its URL when
ready, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.serving.conftest import free_port


def test_up_serves_the_embedded_model_and_stops_on_ctrl_c() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "up", "--port", str(port), "--grpc-port", str(free_port()),
         "--metrics-port", str(free_port())],
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
        assert any("q3serve-tiny-thinker" in line for line in lines), "".join(lines)
        body = {"model": "qwen3-moe", "messages": [{"role": "user", "content": "Add 4524 and 13."}], "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        assert msg["content"] == "4537" and "4 + 3 + 0 = 7" in msg["reasoning_content"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out
    assert "stopping" in out
