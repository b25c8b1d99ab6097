"""`q3serve up` started as a user starts it (a subprocess with a config file), for benchmarks that
compare configurations; stopped with Ctrl-C (SIGINT), as a user stops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UpServer:
    """A `q3serve up` process on free loopback ports; a context manager."""

    def __init__(self, config: dict[str, Any] | None = None, timeout_s: float = 600.0,
                 args: list[str] | None = None) -> None:
        """config None: `q3serve up` with its defaults, as a new user starts it; args: more of its
        command-line options (`--model DIR`)."""
        self.config, self.timeout_s, self.args = config, timeout_s, list(args or [])
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.proc: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory()

    def __enter__(self) -> "UpServer":
        args = ["--port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
                *self.args]
        if self.config is not None:
            path = Path(self._dir.name) / "app.yaml"
            path.write_text(yaml.safe_dump(self.config))
            args += ["--config", str(path)]
        log = open(Path(self._dir.name) / "up.log", "w")  # noqa: SIM115 - closed with the directory
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.cli", "up", *args],
            stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + self.timeout_s
        logfile = Path(self._dir.name) / "up.log"
        while time.monotonic() < deadline:
            text = logfile.read_text()
            if "q3serve is up" in text:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"q3serve up exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise TimeoutError(f"q3serve up was not up within {self.timeout_s}s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._dir.cleanup()


class PeerServer:
    """vLLM's CPU build serving the same checkpoint (benchmarks/vllm_peer.sh serve); a context manager."""

    def __init__(self, model_dir: Path, timeout_s: float = 900.0) -> None:
        self.model_dir, self.timeout_s = model_dir, timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115

    def __enter__(self) -> "PeerServer":
        import httpx

        script = Path(__file__).resolve().parent / "vllm_peer.sh"
        self.proc = subprocess.Popen(["bash", str(script), "serve", str(self.model_dir), str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM peer exited with {self.proc.returncode}:\n{Path(self._log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(5.0)
        self.__exit__(None, None, None)
        raise TimeoutError(f"the vLLM peer was not up within {self.timeout_s}s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the script execs the server: this is its pid
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.proc is not None:  # its engine-core child too, so none of it runs into the next server's turn
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session (start_new_session): only what it started
            except ProcessLookupError:
                pass
