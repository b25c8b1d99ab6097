"""PNG plots of a bench run: latency CDFs per mode, and TTFT and throughput against the rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(run: dict[str, Any], path: Path) -> None:
    """TTFT, ITL and E2EL CDFs of one run, a line per mode."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), dpi=110)
    modes = sorted({r["mode"] for r in run["records"]})
    for ax, (key, label) in zip(axes, [("ttft_s", "TTFT"), ("itl_s", "ITL"), ("e2el_s", "E2EL")]):
        for mode in modes:
            rs = [r for r in run["records"] if r["mode"] == mode and r["error"] is None]
            xs = sorted(x * 1000 for r in rs for x in (r[key] if key == "itl_s" else [r[key]]) if x is not None)
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{mode} ({len(rs)} req)")
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl_s" else "fraction of gaps")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:  # a panel with no data (no gaps: every stream came in one chunk) has no legend
            ax.legend()
    fig.suptitle(run.get("title", "q3serve bench"))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(runs: list[dict[str, Any]], path: Path, series_key: str = "label") -> None:
    """p50/p99 TTFT and output throughput against the offered rate, a line per series."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    series: dict[str, list[dict[str, Any]]] = {}
    for run in (r for r in runs if r["config"]["request_rate"] != "inf"):
        series.setdefault(run["config"].get(series_key) or "q3serve", []).append(run)
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r["config"]["request_rate"])
        rates = [r["config"]["request_rate"] for r in rs]
        a.plot(rates, [r["summary"]["overall"]["p50_ttft_ms"] for r in rs], marker="o", label=f"{name} p50")
        a.plot(rates, [r["summary"]["overall"]["p99_ttft_ms"] for r in rs], marker="x", linestyle="--", label=f"{name} p99")
        b.plot(rates, [r["summary"]["overall"]["output_throughput"] for r in rs], marker="o", label=name)
    a.set_xlabel("request rate (req/s)")
    a.set_ylabel("TTFT (ms)")
    a.set_yscale("log")
    b.set_xlabel("request rate (req/s)")
    b.set_ylabel("output tokens/s")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
