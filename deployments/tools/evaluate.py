"""`q3serve eval`: the held-out task set (deployments/tools/tasks.py, fixed seed, never trained on) asked
through a running server's OpenAI API, in non-thinking mode, thinking mode, and thinking mode at
several budgets. Reports accuracy per task and mode, mean reasoning tokens and latency as JSON,
a PNG of accuracy against thinking budget, and the per-expert routing counts the engines counted
while serving the eval (scraped from the Prometheus export, as an operator would). Then the tool
task (deployments/evaluate_tools.py): large products with the multiplication tool offered against
without it, in both modes.

What a newcomer tries first is scored beside these, leaving their figures as they were: the new
task kinds (`small`, `chat`: their own held-out set, their own columns in every condition; `all`
and `multi_step` keep pooling the original kinds only, and `records` holds only theirs), and the
structured cases of evaluate_tools.py (JSON answers and an `add` tool under tool_choice required,
64 tokens)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from deployments.tools.machine import describe_machine
from deployments.tools.evaluate_tools import (run_structured, run_tool_task, structured_table, summarize_add,
                                             summarize_json, summarize_tools, tool_table)
from deployments.http_client import auth_headers, served_model
from deployments.tools.tasks import KINDS, MULTI_STEP, NEW_KINDS, Task, check, eval_set


@dataclass(frozen=True)
class Condition:
    name: str
    thinking: bool
    budget: int | None = None


def conditions(budgets: list[int]) -> list[Condition]:
    return ([Condition("non-thinking", False), Condition("thinking", True)]
            + [Condition(f"budget-{b}", True, b) for b in budgets])


async def ask(client: httpx.AsyncClient, model: str, task: Task, cond: Condition, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": task.question}], "temperature": 0.0,
        "max_tokens": max_tokens, "chat_template_kwargs": {"enable_thinking": cond.thinking},
    }
    if cond.budget is not None:
        body["thinking_budget"] = cond.budget
    start = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body)
    latency = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"the server answered {r.status_code} to an eval request: {r.text[:300]}")
    out = r.json()
    msg, usage = out["choices"][0]["message"], out["usage"]
    content = msg.get("content") or ""
    return {
        "condition": cond.name, "kind": task.kind, "key": task.key, "question": task.question,
        "expected": task.answer, "content": content, "correct": check(task, content),
        "has_reasoning": bool(msg.get("reasoning_content")),
        "reasoning_tokens": (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0),
        "completion_tokens": usage["completion_tokens"], "finish_reason": out["choices"][0]["finish_reason"],
        "latency_s": round(latency, 4), "pool": r.headers.get("x-q3serve-pool"),
    }


async def run_requests(url: str, model: str, tasks: list[Task], conds: list[Condition], concurrency: int,
                       max_tokens: int, headers: dict[str, str], timeout_s: float, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    limit = asyncio.Semaphore(concurrency)
    jobs = [(t, c) for c in conds for t in tasks]
    bar = tqdm(total=len(jobs), desc="eval", unit="req", disable=not progress)

    async def one(client: httpx.AsyncClient, task: Task, cond: Condition) -> dict:
        async with limit:
            rec = await ask(client, model, task, cond, max_tokens)
            bar.update()
            return rec

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s) as client:
        try:
            return list(await asyncio.gather(*(one(client, t, c) for t, c in jobs)))
        finally:
            bar.close()


def _stats(recs: list[dict]) -> dict[str, Any]:
    lat = sorted(r["latency_s"] for r in recs)
    return {
        "n": len(recs), "accuracy": round(sum(r["correct"] for r in recs) / len(recs), 4),
        "mean_reasoning_tokens": round(statistics.mean(r["reasoning_tokens"] for r in recs), 2),
        "mean_completion_tokens": round(statistics.mean(r["completion_tokens"] for r in recs), 2),
        "with_reasoning": round(sum(r["has_reasoning"] for r in recs) / len(recs), 4),
        "latency_mean_s": round(statistics.mean(lat), 4), "latency_p50_s": lat[len(lat) // 2],
        "latency_p90_s": lat[min(len(lat) - 1, int(len(lat) * 0.9))],
    }


def summarize(records: list[dict], conds: list[Condition], new_records: list[dict] | None = None) -> dict[str, dict[str, Any]]:
    """Per condition: each original kind, multi_step, all (over the original kinds' `records`),
    then a column for each new kind with `new_records` of it."""
    out: dict[str, dict[str, Any]] = {}
    for c in conds:
        recs = [r for r in records if r["condition"] == c.name]
        out[c.name] = {k: _stats([r for r in recs if r["kind"] == k]) for k in KINDS}
        out[c.name]["multi_step"] = _stats([r for r in recs if r["kind"] in MULTI_STEP])
        out[c.name]["all"] = _stats(recs)
        for k in NEW_KINDS:
            new = [r for r in new_records or [] if r["condition"] == c.name and r["kind"] == k]
            if new:
                out[c.name][k] = _stats(new)
    return out


def scrape_expert_counts(metrics_url: str) -> dict[str, list[list[float]]]:
    """{pool: [layer][expert]} summed over replicas, from `ray_q3serve_expert_tokens`."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url, timeout=10).text
    cells: dict[str, dict[tuple[int, int], float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "ray_q3serve_expert_tokens":
            continue
        for s in family.samples:
            key = (int(s.labels["layer"]), int(s.labels["expert"]))
            pool = cells.setdefault(s.labels.get("pool", "?"), {})
            pool[key] = pool.get(key, 0.0) + s.value
    out = {}
    for pool, cell in cells.items():
        layers, experts = max(k[0] for k in cell) + 1, max(k[1] for k in cell) + 1
        out[pool] = [[cell.get((layer, e), 0.0) for e in range(experts)] for layer in range(layers)]
    return out


def settled_expert_counts(metrics_url: str, timeout_s: float = 90.0, quiet_s: float = 15.0) -> dict:
    """Counts once they stop changing for quiet_s (the pool publishes every 2 s and Ray exports
    every few seconds), or the last read at timeout_s."""
    deadline = time.monotonic() + timeout_s
    last, since = scrape_expert_counts(metrics_url), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(2.0)
        now = scrape_expert_counts(metrics_url)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def expert_usage(before: dict, after: dict) -> dict[str, Any]:
    """Per-pool counts over the eval (after - before) and how uneven they are per layer."""
    counts, unevenness = {}, {}
    for pool, grid in after.items():
        base = before.get(pool)
        diff = [[a - (base[i][j] if base else 0.0) for j, a in enumerate(row)] for i, row in enumerate(grid)]
        counts[pool] = diff
        per_layer = []
        for row in diff:
            total = sum(row)
            if total <= 0:
                continue
            mean = total / len(row)
            per_layer.append({"max_over_mean": round(max(row) / mean, 3), "min_over_mean": round(min(row) / mean, 3),
                              "cv": round(statistics.pstdev(row) / mean, 3)})
        unevenness[pool] = per_layer
    return {"counts": counts, "per_layer": unevenness}


def plot(summary: dict[str, dict[str, Any]], budgets: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    groups = [*MULTI_STEP, "multi_step"]
    for g in groups:
        ys = [summary[f"budget-{b}"][g]["accuracy"] for b in budgets]
        style = {"linewidth": 3, "color": "black"} if g == "multi_step" else {"linewidth": 1.2, "alpha": 0.8}
        line, = ax.plot(budgets, ys, marker="o", label=g if g != "multi_step" else "multi-step (all)", **style)
        if g == "multi_step":
            ax.axhline(summary["thinking"][g]["accuracy"], color="black", linestyle="--", linewidth=1,
                       label="multi-step, thinking unlimited")
            ax.axhline(summary["non-thinking"][g]["accuracy"], color="gray", linestyle=":", linewidth=1.5,
                       label="multi-step, non-thinking")
    ax.set_xscale("symlog", linthresh=16)
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("thinking budget (tokens)")
    ax.set_ylabel("accuracy on held-out tasks")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def evaluate(url: str, model: str | None = None, per_task: int = 20, budgets: list[int] | None = None,
             seed: int = 1234, concurrency: int = 8, max_tokens: int = 512, api_key: str | None = None,
             metrics_url: str | None = None, timeout_s: float = 300.0, progress: bool = True,
             tool_items: int | None = None, new_kinds: bool = True, json_items: int | None = None,
             add_items: int | None = None) -> dict[str, Any]:
    """tool_items: held-out products of the tool task (default per_task; 0 skips it); new_kinds:
    also ask the NEW_KINDS' held-out set (per_task each) in every condition; json_items: held-out
    `small` questions of the JSON case (default per_task; 0 skips it); add_items: held-out
    additions of the add-tool case (default tool_items; 0 skips it)."""
    budgets = sorted(budgets if budgets is not None else [0, 8, 16, 32, 64, 128])
    headers = auth_headers(api_key)
    model = model or served_model(url, headers)
    tasks = eval_set(per_task, seed)
    conds = conditions(budgets)
    before = settled_expert_counts(metrics_url) if metrics_url else {}
    start = time.perf_counter()
    records = asyncio.run(run_requests(url, model, tasks, conds, concurrency, max_tokens, headers, timeout_s, progress))
    wall = time.perf_counter() - start
    tool_items = per_task if tool_items is None else tool_items
    tool_records = (asyncio.run(run_tool_task(url, model, tool_items, seed, concurrency, max_tokens, headers, timeout_s))
                    if tool_items else [])
    new_records = (asyncio.run(run_requests(url, model, eval_set(per_task, seed, kinds=NEW_KINDS), conds, concurrency,
                                            max_tokens, headers, timeout_s, progress)) if new_kinds else [])
    json_items = per_task if json_items is None else json_items
    add_items = tool_items if add_items is None else add_items
    json_records, add_records = (asyncio.run(run_structured(url, model, json_items, add_items, seed, concurrency,
                                                            headers, timeout_s)) if json_items or add_items else ([], []))
    result: dict[str, Any] = {
        "machine": describe_machine(), "server": url, "model": model, "wall_s": round(wall, 1),
        "settings": {"per_task": per_task, "seed": seed, "budgets": budgets, "concurrency": concurrency,
                     "max_tokens": max_tokens, "temperature": 0.0, "kinds": list(KINDS), "multi_step": list(MULTI_STEP),
                     "tool_items": tool_items, "new_kinds": list(NEW_KINDS) if new_kinds else [],
                     "json_items": json_items, "add_items": add_items},
        "conditions": [asdict(c) for c in conds],
        "summary": summarize(records, conds, new_records),
    }
    if metrics_url:
        result["expert_usage"] = expert_usage(before, settled_expert_counts(metrics_url))
    result["tool_use"] = summarize_tools(tool_records)
    result["json"] = summarize_json(json_records)
    result["add_tool"] = summarize_add(add_records)
    result["records"] = records
    result["tool_records"] = tool_records
    result["new_kind_records"] = new_records
    result["json_records"] = json_records
    result["add_tool_records"] = add_records
    return result


def table(summary: dict[str, dict[str, Any]]) -> str:
    """Accuracy per condition (rows) and task (columns), plus mean reasoning tokens of `all`."""
    first = next(iter(summary.values()), {})
    cols = [*KINDS, "multi_step", "all", *(k for k in NEW_KINDS if k in first)]
    lines = ["condition".ljust(14) + "".join(c[:10].rjust(11) for c in cols) + "  think_tok".rjust(11)]
    for name, row in summary.items():
        lines.append(name.ljust(14) + "".join(f"{row[c]['accuracy']:.2f}".rjust(11) for c in cols)
                     + f"{row['all']['mean_reasoning_tokens']:.1f}".rjust(11))
    return "\n".join(lines)


def main(args: Any) -> int:  # noqa: ANN401 - the argparse namespace of `q3serve eval`
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else None
    result = evaluate(args.url, args.model, args.per_task, budgets, args.seed, args.concurrency, args.max_tokens,
                      args.api_key, args.metrics_url or None, args.timeout, tool_items=args.tool_items,
                      json_items=args.json_items, add_items=args.add_items)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result["summary"]))
    if result["tool_use"]:
        print(tool_table(result["tool_use"]))
    if result["json"] or result["add_tool"]:
        print(structured_table(result["json"], result["add_tool"]))
    png = out.with_name(out.stem + "_budget.png") if args.plot is None else (Path(args.plot) if args.plot else None)
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(result["summary"], result["settings"]["budgets"], png,
             f"{result['model']}: accuracy vs thinking budget ({args.per_task} held-out items per task)")
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0
