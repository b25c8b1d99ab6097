"""A Prometheus server as a child process (Debian's `prometheus` binary, not installed here), scraping
given targets into a throw-away TSDB, and its HTTP query API: for checks that must see what a real
Prometheus makes of q3serve's metrics export."""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.servers import free_port


class Prometheus:
    """`prometheus` on a free loopback port scraping `targets` every `scrape_s`; a context manager
    that stops the process it started (by its pid) however the block ends."""

    def __init__(self, targets: list[str], scrape_s: float = 5.0, timeout_s: float = 60.0) -> None:
        self.targets, self.scrape_s, self.timeout_s = targets, scrape_s, timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._dir = tempfile.TemporaryDirectory()

    def __enter__(self) -> "Prometheus":
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("no prometheus binary on PATH: apt-get install -y prometheus")
        d = Path(self._dir.name)
        (d / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": f"{self.scrape_s:g}s", "scrape_timeout": f"{self.scrape_s:g}s"},
            "scrape_configs": [{"job_name": "q3serve", "static_configs": [{"targets": self.targets}]}],
        }))
        self.log = open(d / "prometheus.log", "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._until(lambda: httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200, "ready")
            self._until(self._targets_up, "scraping every target")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()
        self._dir.cleanup()

    def version(self) -> str:
        return httpx.get(f"{self.url}/api/v1/status/buildinfo", timeout=10).json()["data"]["version"]

    def _targets_up(self) -> bool:
        active = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return len(active) == len(self.targets) and all(t["health"] == "up" for t in active)

    def _until(self, ok: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: "
                                   f"{(Path(self._dir.name) / 'prometheus.log').read_text()[-2000:]}")
            try:
                if ok():
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"prometheus was not {what} within {self.timeout_s}s")

    # -- the query API ------------------------------------------------------------------------
    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        """The series of a range query: [{"metric": labels, "values": [(t, v), ...]}], values as
        floats (NaN kept: a histogram_quantile over no observations)."""
        r = httpx.get(f"{self.url}/api/v1/query_range", timeout=60,
                      params={"query": expr, "start": start, "end": end, "step": f"{step_s:g}s"})
        body = r.json()
        if body.get("status") != "success":
            raise ValueError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
        return [{"metric": s["metric"], "values": [(float(t), float(v)) for t, v in s["values"]]}
                for s in body["data"]["result"]]

    def label_values(self, metric: str, label: str) -> list[str]:
        """Grafana's label_values(metric, label): the label's values on the metric's series."""
        r = httpx.get(f"{self.url}/api/v1/series", params={"match[]": metric}, timeout=30).json()
        return sorted({s[label] for s in r["data"] if label in s}, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))


def finite(series: list[dict[str, Any]]) -> list[float]:
    """Every sample of the series that is a number (not NaN or infinite)."""
    return [v for s in series for _, v in s["values"] if math.isfinite(v)]
