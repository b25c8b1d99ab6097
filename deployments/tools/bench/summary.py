"""Summaries under vLLM's names and definitions (`vllm bench serve`), so the two read side by
side: TTFT (send to first generated chunk), TPOT ((E2EL - TTFT) / (output tokens - 1), per
request), ITL (the gaps between chunks), E2EL; mean, median, std, p50/p90/p99 in ms; request,
output-token and total-token throughput over the run's duration; goodput (requests per second
that met every SLO given)."""

from __future__ import annotations

import statistics
from typing import Any

from deployments.tools.bench.clients import Record

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, which vLLM uses)."""
    xs = sorted(values)
    if not xs:
        return 0.0
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _tpot(r: Record) -> float | None:
    if r.output_tokens > 1 and r.e2el_s is not None and r.ttft_s is not None:
        return (r.e2el_s - r.ttft_s) / (r.output_tokens - 1)
    return None


def _samples(records: list[Record]) -> dict[str, list[float]]:
    ok = [r for r in records if r.ok]
    return {
        "ttft": [r.ttft_s * 1000 for r in ok],
        "tpot": [t * 1000 for r in ok if (t := _tpot(r)) is not None],
        "itl": [g * 1000 for r in ok for g in r.itl_s],
        "e2el": [r.e2el_s * 1000 for r in ok if r.e2el_s is not None],
    }


def _meets(r: Record, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft_s * 1000 if r.ttft_s is not None else None,
              "tpot": (t * 1000 if (t := _tpot(r)) is not None else 0.0),
              "e2el": r.e2el_s * 1000 if r.e2el_s is not None else None}
    return r.ok and all(values[k] is not None and values[k] <= v for k, v in slos.items())


def summarize(records: list[Record], duration_s: float, slos: dict[str, float] | None = None) -> dict[str, Any]:
    """One group's summary (all requests, or one mode's)."""
    ok = [r for r in records if r.ok]
    out: dict[str, Any] = {
        "num_requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "duration_s": round(duration_s, 3),
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": sum(r.output_tokens for r in ok),
        "total_reasoning_tokens": sum(r.reasoning_tokens for r in ok),
    }
    d = max(duration_s, 1e-9)
    out["request_throughput"] = round(len(ok) / d, 4)
    out["output_throughput"] = round(out["total_output_tokens"] / d, 3)
    out["total_token_throughput"] = round((out["total_input_tokens"] + out["total_output_tokens"]) / d, 3)
    for name, xs in _samples(records).items():
        out[f"mean_{name}_ms"] = round(statistics.fmean(xs), 3) if xs else 0.0
        out[f"median_{name}_ms"] = round(statistics.median(xs), 3) if xs else 0.0
        out[f"std_{name}_ms"] = round(statistics.pstdev(xs), 3) if xs else 0.0
        for p in PERCENTILES:
            out[f"p{p}_{name}_ms"] = round(percentile(xs, p), 3)
    if slos:
        good = sum(_meets(r, slos) for r in records)
        out["goodput_slos_ms"] = dict(slos)
        out["good_requests"] = good
        out["request_goodput"] = round(good / d, 4)
    pools: dict[str, int] = {}
    for r in ok:
        pools[r.pool or "?"] = pools.get(r.pool or "?", 0) + 1
    out["pools"] = pools
    errors = [r.error for r in records if r.error]
    out["errors"] = sorted(set(errors))[:10]
    return out


def summarize_by_mode(records: list[Record], duration_s: float, slos: dict[str, float] | None) -> dict[str, Any]:
    """{"overall": ..., "thinking": ..., "no-think": ...} for the modes present."""
    groups = {"overall": records}
    for mode in sorted({r.mode for r in records}):
        groups[mode] = [r for r in records if r.mode == mode]
    return {name: summarize(rs, duration_s, slos) for name, rs in groups.items()}


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """vLLM's --goodput form: 'ttft:500 tpot:50 e2el:5000' (milliseconds)."""
    slos = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"goodput: '{item}' is not ttft:MS, tpot:MS or e2el:MS")
        slos[name] = float(value)
    return slos
