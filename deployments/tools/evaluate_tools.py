"""`q3serve eval`'s tool task: held-out products too large for the model's head
(deployments/tools/tool_use.py), asked through the OpenAI API with the multiplication tool offered
(`tool_choice` auto; the eval runs the agent loop: it executes each call and sends the result
back as a `tool` turn until the model answers) and without it, in both modes."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx

from deployments.tools.tasks import Task, check
from deployments.tools.tool_use import multiply_tool, operands, run_multiply, tool_eval_set

MAX_ROUNDS = 3  # model turns per item: a call, its answer, one spare


async def agent_loop(client: httpx.AsyncClient, model: str, task: Task, thinking: bool, with_tool: bool,
                     max_tokens: int) -> dict[str, Any]:
    tool = multiply_tool()
    messages: list[dict[str, Any]] = [{"role": "user", "content": task.question}]
    calls: list[dict[str, Any]] = []
    start, content, finish = time.perf_counter(), "", None
    for _ in range(MAX_ROUNDS):
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0.0, "max_tokens": max_tokens,
                                "chat_template_kwargs": {"enable_thinking": thinking}}
        if with_tool:
            body |= {"tools": [tool], "tool_choice": "auto"}
        r = await client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code} to a tool eval request: {r.text[:300]}")
        choice = r.json()["choices"][0]
        msg, finish = choice["message"], choice["finish_reason"]
        content = msg.get("content") or ""
        if not msg.get("tool_calls"):
            break
        messages.append({"role": "assistant", "content": content, "tool_calls": msg["tool_calls"]})
        for call in msg["tool_calls"]:
            fn = call["function"]
            result = run_multiply(fn["name"], fn["arguments"], tool)
            calls.append({"name": fn["name"], "arguments": fn["arguments"], "result": result})
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    a, b = operands(task)
    return {
        "mode": "thinking" if thinking else "non-thinking", "tool": with_tool, "key": task.key,
        "question": task.question, "expected": task.answer, "content": content, "correct": check(task, content),
        "called": bool(calls), "call_right": any(c["result"] == str(a * b) for c in calls), "calls": calls,
        "finish_reason": finish, "latency_s": round(time.perf_counter() - start, 4),
    }


async def run_tool_task(url: str, model: str, n: int, seed: int, concurrency: int, max_tokens: int,
                        headers: dict[str, str], timeout_s: float) -> list[dict[str, Any]]:
    limit = asyncio.Semaphore(concurrency)
    jobs = [(t, thinking, with_tool) for thinking in (False, True) for with_tool in (True, False)
            for t in tool_eval_set(n, seed)]

    async def one(client: httpx.AsyncClient, task: Task, thinking: bool, with_tool: bool) -> dict[str, Any]:
        async with limit:
            return await agent_loop(client, model, task, thinking, with_tool, max_tokens)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s) as client:
        return list(await asyncio.gather(*(one(client, *job) for job in jobs)))


def summarize_tools(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{mode: {"with_tool": ..., "without_tool": ...}}: accuracy, how often the tool was called and
    called with the right operands, mean latency of the whole loop."""
    out: dict[str, dict[str, Any]] = {}
    for mode in ("non-thinking", "thinking"):
        for with_tool in (True, False):
            recs = [r for r in records if r["mode"] == mode and r["tool"] == with_tool]
            if not recs:
                continue
            out.setdefault(mode, {})["with_tool" if with_tool else "without_tool"] = {
                "n": len(recs), "accuracy": round(sum(r["correct"] for r in recs) / len(recs), 4),
                "called": round(sum(r["called"] for r in recs) / len(recs), 4),
                "call_right": round(sum(r["call_right"] for r in recs) / len(recs), 4),
                "latency_mean_s": round(statistics.mean(r["latency_s"] for r in recs), 4),
            }
    return out


def tool_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["tool task".ljust(14) + "with tool".rjust(11) + "called".rjust(9) + "right call".rjust(12) + "without".rjust(10)]
    for mode, row in summary.items():
        w, wo = row["with_tool"], row["without_tool"]
        lines.append(mode.ljust(14) + f"{w['accuracy']:.2f}".rjust(11) + f"{w['called']:.2f}".rjust(9)
                     + f"{w['call_right']:.2f}".rjust(12) + f"{wo['accuracy']:.2f}".rjust(10))
    return "\n".join(lines)
