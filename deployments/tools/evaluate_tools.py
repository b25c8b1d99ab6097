"""`q3serve eval`'s tool task: held-out products too large for the model's head
(deployments/tools/tool_use.py), asked through the OpenAI API with the multiplication tool offered
(`tool_choice` auto; the eval runs the agent loop: it executes each call and sends the result
back as a `tool` turn until the model answers) and without it, in both modes.

Also the structured cases a newcomer tries first, within 64 tokens, in both modes:
- JSON: held-out `small` questions with `response_format` json_object (the question alone),
  json_schema `{"answer": integer}` (no bounds, the question alone), and instructor's JSON mode
  (its system message with that schema, plus json_object): the share of answers that parse,
  conform and are right.
- add tool: held-out additions (single-digit operands and 2-5 digit ones) with an `add` tool of
  unbounded integer parameters under `tool_choice` "required": the share of parsed calls with the
  right arguments, then (the result sent back, `tool_choice` auto) of right answers."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx

from deployments.tools import json_answers
from deployments.tools.tasks import Task, check, eval_set
from deployments.tools.tool_use import (add_eval_set, arith_operands, multiply_tool, operands, run_integer_tool,
                                        run_multiply, tool_eval_set)

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


STRUCTURED_MAX_TOKENS = 64  # what a newcomer's call allows; every structured answer must fit in it
JSON_FORMATS = ("json_object", "json_schema", "instructor_json")
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


def json_request(task: Task, fmt: str) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
    """(messages, response_format, the key the answer must have (None: any one key))."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": task.question}]
    if fmt == "json_object":
        return messages, {"type": "json_object"}, None
    if fmt == "json_schema":
        return messages, {"type": "json_schema", "json_schema": {"name": "Answer", "schema": ANSWER_SCHEMA}}, "answer"
    if fmt == "instructor_json":  # instructor's Mode.JSON for `class Answer(BaseModel): answer: int`
        system = json_answers.instructor_system(json_answers.schema("answer", 0))
        return [{"role": "system", "content": system}, *messages], {"type": "json_object"}, "answer"
    raise ValueError(fmt)


async def ask_json(client: httpx.AsyncClient, model: str, task: Task, fmt: str, thinking: bool) -> dict[str, Any]:
    messages, response_format, key = json_request(task, fmt)
    body = {"model": model, "messages": messages, "temperature": 0.0, "max_tokens": STRUCTURED_MAX_TOKENS,
            "response_format": response_format, "chat_template_kwargs": {"enable_thinking": thinking}}
    start = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"the server answered {r.status_code} to a JSON eval request: {r.text[:300]}")
    out = r.json()
    content = out["choices"][0]["message"].get("content") or ""
    return {"mode": "thinking" if thinking else "non-thinking", "format": fmt, "key": task.key,
            "question": task.question, "expected": task.answer, "content": content,
            **json_answers.parse(content, task, key), "finish_reason": out["choices"][0]["finish_reason"],
            "completion_tokens": out["usage"]["completion_tokens"], "latency_s": round(time.perf_counter() - start, 4)}


async def add_tool_call(client: httpx.AsyncClient, model: str, task: Task, thinking: bool) -> dict[str, Any]:
    """The call under tool_choice "required", then (its result sent back) the answer."""
    tool = multiply_tool("add", ("a", "b"), "Add two integers.")
    _, a, b = arith_operands(task)
    messages: list[dict[str, Any]] = [{"role": "user", "content": task.question}]
    base = {"model": model, "temperature": 0.0, "max_tokens": STRUCTURED_MAX_TOKENS, "tools": [tool],
            "chat_template_kwargs": {"enable_thinking": thinking}}
    start = time.perf_counter()
    r = await client.post("/v1/chat/completions", json={**base, "messages": messages, "tool_choice": "required"})
    if r.status_code != 200:
        raise RuntimeError(f"the server answered {r.status_code} to an add-tool eval request: {r.text[:300]}")
    out = r.json()
    msg, finish = out["choices"][0]["message"], out["choices"][0]["finish_reason"]
    calls = msg.get("tool_calls") or []
    args = None
    if calls:
        try:
            args = json.loads(calls[0]["function"]["arguments"])
        except ValueError:
            args = None
    call_right = (len(calls) == 1 and calls[0]["function"]["name"] == "add" and isinstance(args, dict)
                  and args == {"a": a, "b": b} and all(type(v) is int for v in args.values()))
    content = ""
    if calls:
        result = run_integer_tool(calls[0]["function"]["name"], calls[0]["function"]["arguments"], tool, "+")
        messages += [{"role": "assistant", "content": msg.get("content") or "", "tool_calls": calls[:1]},
                     {"role": "tool", "tool_call_id": calls[0]["id"], "content": result}]
        r2 = await client.post("/v1/chat/completions", json={**base, "messages": messages, "tool_choice": "auto"})
        if r2.status_code != 200:
            raise RuntimeError(f"the server answered {r2.status_code} to an add-tool eval request: {r2.text[:300]}")
        content = r2.json()["choices"][0]["message"].get("content") or ""
    return {"mode": "thinking" if thinking else "non-thinking", "key": task.key, "question": task.question,
            "expected": task.answer, "small_operands": task.key.startswith("small:"), "called": bool(calls),
            "call_right": call_right, "arguments": calls[0]["function"]["arguments"] if calls else None,
            "finish_reason": finish, "completion_tokens": out["usage"]["completion_tokens"], "content": content,
            "correct": check(task, content), "latency_s": round(time.perf_counter() - start, 4)}


async def run_structured(url: str, model: str, json_items: int, add_items: int, seed: int, concurrency: int,
                         headers: dict[str, str], timeout_s: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The JSON case's and the add-tool case's records."""
    limit = asyncio.Semaphore(concurrency)
    json_tasks = eval_set(json_items, seed, kinds=("small",)) if json_items else []
    add_tasks = add_eval_set(add_items, seed) if add_items else []

    async def one(coro_fn, *args):  # noqa: ANN001, ANN002, ANN202
        async with limit:
            return await coro_fn(*args)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s) as client:
        json_jobs = [one(ask_json, client, model, t, fmt, thinking)
                     for thinking in (False, True) for fmt in JSON_FORMATS for t in json_tasks]
        add_jobs = [one(add_tool_call, client, model, t, thinking) for thinking in (False, True) for t in add_tasks]
        done = await asyncio.gather(*json_jobs, *add_jobs)
    return list(done[:len(json_jobs)]), list(done[len(json_jobs):])


def _share(recs: list[dict[str, Any]], field: str) -> float:
    return round(sum(bool(r[field]) for r in recs) / len(recs), 4)


def summarize_json(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{mode: {format: parsed, conforms, correct, finished (not cut by max_tokens), mean tokens}}."""
    out: dict[str, dict[str, Any]] = {}
    for mode in ("non-thinking", "thinking"):
        for fmt in JSON_FORMATS:
            recs = [r for r in records if r["mode"] == mode and r["format"] == fmt]
            if recs:
                out.setdefault(mode, {})[fmt] = {
                    "n": len(recs), "parsed": _share(recs, "parsed"), "conforms": _share(recs, "conforms"),
                    "correct": _share(recs, "correct"),
                    "finished": round(sum(r["finish_reason"] != "length" for r in recs) / len(recs), 4),
                    "mean_completion_tokens": round(statistics.mean(r["completion_tokens"] for r in recs), 2),
                }
    return out


def summarize_add(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{mode: call_right (all, single-digit, larger operands), called, answered right, mean call tokens}."""
    out: dict[str, dict[str, Any]] = {}
    for mode in ("non-thinking", "thinking"):
        recs = [r for r in records if r["mode"] == mode]
        if not recs:
            continue
        small = [r for r in recs if r["small_operands"]]
        large = [r for r in recs if not r["small_operands"]]
        out[mode] = {"n": len(recs), "called": _share(recs, "called"), "call_right": _share(recs, "call_right"),
                     "call_right_small": _share(small, "call_right") if small else None,
                     "call_right_large": _share(large, "call_right") if large else None,
                     "accuracy": _share(recs, "correct"),
                     "mean_call_tokens": round(statistics.mean(r["completion_tokens"] for r in recs), 2)}
    return out


def structured_table(json_summary: dict[str, dict[str, Any]], add_summary: dict[str, dict[str, Any]]) -> str:
    lines = []
    if json_summary:
        lines.append("JSON (64 tok)".ljust(14) + "".join(f.rjust(17) for f in JSON_FORMATS) + "   (parsed/conform/right)")
        for mode, row in json_summary.items():
            lines.append(mode.ljust(14) + "".join(
                f"{row[f]['parsed']:.2f}/{row[f]['conforms']:.2f}/{row[f]['correct']:.2f}".rjust(17) for f in JSON_FORMATS))
    if add_summary:
        lines.append("add tool".ljust(14) + "right call".rjust(11) + "small".rjust(7) + "large".rjust(7)
                     + "answer".rjust(8) + "call tok".rjust(10))
        for mode, row in add_summary.items():
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(mode.ljust(14) + fmt(row["call_right"]).rjust(11) + fmt(row["call_right_small"]).rjust(7)
                         + fmt(row["call_right_large"]).rjust(7) + fmt(row["accuracy"]).rjust(8)
                         + f"{row['mean_call_tokens']:.1f}".rjust(10))
    return "\n".join(lines)
