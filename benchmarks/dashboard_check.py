"""The Grafana dashboard checked for real: `q3serve up` (the embedded model, both pools, free ports)
scraped by a real Prometheus every 5 s while `q3serve bench` loads it, then every panel's query
evaluated through Prometheus's HTTP API as Grafana would send it, with the template variables
substituted (`$pool` All, `$layer` each layer the `layer` variable lists, `$__rate_interval` 1m: what
Grafana makes of a datasource left at its 15 s default). Every panel must return data.

The load is two bench phases with the same seed, so that the second repeats the first's prompts
(the prefix-cache hit rate gets real hits, as a re-sent conversation would), and during the second
a request every few seconds that is wrong on purpose (an unknown model: 404, a prompt over the
context: 400), so that the errors panel shows codes. No replica is failed, so the retries panel shows its zero.

Installs nothing: it needs Debian's `prometheus` binary on PATH (`apt-get install -y prometheus`).
Writes benchmarks/results/dashboard_check.json (machine, sizes, per panel: its queries, series,
samples, largest value, whether it had data) and dashboard_check.png (each panel's range data).

    python -m benchmarks.dashboard_check [--phase-s 50] [--rate 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.prometheus import Prometheus, finite
from benchmarks.servers import UpServer
from deployments.tools.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "helm" / "q3serve" / "dashboards" / "q3serve.json"
RESULTS = Path(__file__).parent / "results"
RATE_INTERVAL = "1m"
STEP_S = 5.0
OUTPUT_LEN = 64


def bench(url: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One `q3serve bench` phase (the CLI, as a user runs it); its overall summary."""
    cmd = [sys.executable, "-m", "deployments.cli", "bench", "--url", url, "--backend", "openai-chat",
           "--dataset", "random", "--input-len", "64", "--output-len", str(OUTPUT_LEN), "--thinking-share", "0.5",
           "--request-rate", str(args.rate), "--duration", str(args.phase_s), "--max-concurrency", "16",
           "--num-prompts", str(int(args.rate * args.phase_s * 2) + 10), "--timeout", "120", "--seed", "1",
           "--ignore-eos", "--out", str(out), "--plot", "", "--no-progress"]
    run = subprocess.run(cmd, timeout=args.phase_s + 300, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"q3serve bench exited with {run.returncode}: {run.stderr[-2000:]}")
    s = json.loads(out.read_text())["runs"][0]["summary"]["overall"]
    keep = ("num_requests", "completed", "failed", "request_throughput", "output_throughput", "p50_ttft_ms",
            "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "pools", "errors")
    return {k: s[k] for k in keep if k in s}


def wrong_requests(url: str, model: str, model_len: int, stop: threading.Event, every_s: float = 6.0) -> dict[str, list[int]]:
    """Until `stop`: every few seconds a request the server must refuse, an unknown model (404) and a
    prompt longer than the context (400). Spread out, because Prometheus sees a counter's growth, not
    the value its series first appears with."""
    codes: dict[str, list[int]] = {"unknown model": [], "prompt over the context": []}
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.wait(every_s):
            r = http.post("/v1/completions", json={"model": "no-such-model", "prompt": "hi", "max_tokens": 2})
            codes["unknown model"].append(r.status_code)
            r = http.post("/v1/completions", json={"model": model, "prompt": [100] * (model_len + 8),
                                                      "max_tokens": 2})
            codes["prompt over the context"].append(r.status_code)
    return codes


def with_wrong_requests(url: str, model: str, model_len: int, phase: Any) -> tuple[Any, dict[str, list[int]]]:
    """`phase()`'s result while wrong_requests runs beside it."""
    stop, box = threading.Event(), {}
    thread = threading.Thread(target=lambda: box.update(codes=wrong_requests(url, model, model_len, stop)), daemon=True)
    thread.start()
    try:
        return phase(), box
    finally:
        stop.set()
        thread.join(timeout=120)


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${name}", value)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    for k, v in labels.items():
        fmt = fmt.replace("{{" + k + "}}", v)
    return fmt


def evaluate(prom: Prometheus, dashboard: dict[str, Any], start: float, end: float) -> tuple[dict, list[dict]]:
    """The variables' values, and each panel (a repeated one once per value) with its targets' results."""
    layers = prom.label_values('ray_q3serve_expert_tokens{pool=~".*"}', "layer")
    variables = {"pools": prom.label_values("ray_q3serve_queue_depth", "pool"), "layers": layers}
    panels = []
    for p in dashboard["panels"]:
        if p["type"] == "row":
            continue
        for layer in (layers if p.get("repeat") == "layer" else [None]):
            subs = {"pool": ".*", "__rate_interval": RATE_INTERVAL, **({"layer": layer} if layer else {})}
            targets = []
            for t in p["targets"]:
                expr = substitute(t["expr"], subs)
                series = prom.query_range(expr, start, end, STEP_S)
                values = finite(series)
                targets.append({"expr": expr, "legend": t.get("legendFormat", ""), "series": len(series),
                                "samples": len(values), "max": max(values) if values else None,
                                "data": [{"name": legend(t.get("legendFormat", ""), s["metric"]), "values": s["values"]}
                                         for s in series]})
            panels.append({"title": substitute(p["title"], subs), "type": p["type"], "targets": targets,
                           "has_data": all(t["samples"] > 0 for t in targets),
                           "nonzero": any((t["max"] or 0) > 0 for t in targets)})
    return variables, panels


def plot(panels: list[dict[str, Any]], start: float, out: Path) -> None:
    """One small subplot per panel: its series over the run (a heatmap: experts x time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        ax.set_title(p["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        if p["type"] == "heatmap":
            rows_ = sorted(p["targets"][0]["data"], key=lambda s: int(s["name"]))
            ts = sorted({t for s in rows_ for t, _ in s["values"]})
            grid = np.full((len(rows_), len(ts)), np.nan)
            for i, s in enumerate(rows_):
                for t, v in s["values"]:
                    grid[i, ts.index(t)] = v
            im = ax.imshow(grid, aspect="auto", origin="lower", cmap="Oranges", interpolation="nearest",
                           extent=(ts[0] - start, ts[-1] - start, -0.5, len(rows_) - 0.5))
            ax.set_ylabel("expert", fontsize=7)
            fig.colorbar(im, ax=ax).ax.tick_params(labelsize=6)
        else:
            for t in p["targets"]:
                for s in t["data"]:
                    ax.plot([x - start for x, _ in s["values"]], [v for _, v in s["values"]], lw=1, label=s["name"])
            if ax.lines:
                ax.legend(fontsize=6, loc="upper left")
        ax.set_xlabel("s", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def sizes(url: str) -> dict[str, Any]:
    from cluster.default_model import default_model_path

    cfg = json.loads((default_model_path() / "config.json").read_text())
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    return {"model": model["id"], "max_model_len": model.get("max_model_len"),
            **{k: cfg[k] for k in ("num_hidden_layers", "num_experts", "num_experts_per_tok", "hidden_size")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase-s", type=float, default=50.0, help="seconds of each of the two bench phases")
    ap.add_argument("--rate", type=float, default=4.0, help="requests/s of the bench's Poisson arrivals")
    ap.add_argument("--out", default=str(RESULTS / "dashboard_check.json"))
    args = ap.parse_args()
    dashboard = json.loads(DASHBOARD.read_text())
    with tempfile.TemporaryDirectory() as tmp, UpServer(timeout_s=600) as up, \
            Prometheus([f"127.0.0.1:{up.metrics_port}"], scrape_s=STEP_S) as prom:
        info = sizes(up.url)
        start = time.time()
        phases = [bench(up.url, Path(tmp) / "phase1.json", args)]
        second, refused = with_wrong_requests(up.url, info["model"], info["max_model_len"],
                                              lambda: bench(up.url, Path(tmp) / "phase2.json", args))
        phases.append(second)
        time.sleep(25)  # Ray's export period (10 s) and two scrapes: the last requests reach Prometheus
        end = time.time()
        variables, panels = evaluate(prom, dashboard, start - 30, end)
        version = prom.version()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(panels, start, out.with_suffix(".png"))
    for p in panels:
        for t in p["targets"]:
            t["names"] = [s["name"] for s in t.pop("data")]
    result = {
        "machine": describe_machine(), "prometheus": version, "scrape_interval_s": STEP_S,
        "rate_interval": RATE_INTERVAL, "query_step_s": STEP_S, "window_s": round(end - start + 30, 1),
        "sizes": info, "load": {"phase_s": args.phase_s, "rate": args.rate, "input_len": 64, "output_len": OUTPUT_LEN,
                                "thinking_share": 0.5, "phases": phases, "refused": refused.get("codes")},
        "variables": variables, "all_panels_have_data": all(p["has_data"] for p in panels), "panels": panels,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    for p in panels:
        print(f"{'ok ' if p['has_data'] else 'NO DATA'} {p['title']}: "
              + ", ".join(f"{t['series']} series, max {t['max']}" for t in p["targets"]))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if result["all_panels_have_data"] else 1


if __name__ == "__main__":
    sys.exit(main())
