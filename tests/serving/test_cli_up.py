"""`q3serve up` with no model argument serves the embedded trained model, prints its URL when
ready, and on SIGTERM (or Ctrl-C) drains: no new request is taken (503), a request in flight
that finishes within the grace period completes, one that cannot ends with a retriable 503
error event instead of a cut connection; then it exits cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.helpers.serving import free_port, stream_completion


def test_up_serves_the_embedded_model_and_drains_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "app.yaml"
    # the fast pool takes one request at a time, so a second one waits in Serve's queue
    config.write_text("thinking: {graceful_shutdown_timeout_s: 4}\n"
                      "fast: {graceful_shutdown_timeout_s: 4, max_ongoing_requests: 1}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "up", "--port", str(port), "--grpc-port", str(free_port()),
         "--metrics-port", str(free_port()), "--config", str(config)],
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
        base = f"http://127.0.0.1:{port}"
        body = {"model": "qwen3-moe", "messages": [{"role": "user", "content": "Add 4524 and 13."}], "temperature": 0}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        assert msg["content"] == "4537" and "4 + 3 + 0 = 7" in msg["reasoning_content"]
        # In flight at SIGTERM: a short request on the thinking pool (done well within the 4 s
        # grace), one on the fast pool far too long for it, and one queued behind that one.
        short, long, queued = {}, {}, {}
        threads = []
        for out, n, extra in ((long, 4000, {}), (short, 40, {"thinking_budget": 1000}), (queued, 40, {})):
            started = threading.Event()
            stream_body = {"model": "qwen3-moe", "prompt": "Add 4524 and 13.", "max_tokens": n, "ignore_eos": True, **extra}
            threads.append(threading.Thread(target=stream_completion, args=(base, stream_body, out, started), daemon=True))
            threads[-1].start()
            if out is queued:
                time.sleep(1.5)
                assert not started.is_set(), queued  # it waits for the fast pool's one slot
            else:
                assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        refused = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"], refused.text
        for t in threads:
            t.join(60)
        assert short.get("finish_reason") == "length" and "error" not in short and short["pool"] == "thinking", short
        assert long["error"]["code"] == 503 and "retry" in long["error"]["message"], long
        # the queued one had sent nothing: a whole HTTP 503 in OpenAI's shape, not a cut connection
        assert queued["status"] == 503 and "retry" in queued["error"]["message"], queued
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out
    assert "stopping" in out and "ended with a retriable error" in out, out
