"""The committed default model served as `q3serve up` serves it (AppConfig() with no model):
fixed questions answered correctly in thinking mode with the reasoning shown, and answered
without reasoning in non-thinking mode; held-out products answered through the multiplication
tool (tool_choice auto: the model calls it; the agent loop with the openai SDK and langchain,
streamed and not); `q3serve eval` against the same server, with its tool task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from deployments.config import AppConfig
from deployments.tools.tool_use import multiply_tool, operands, tool_eval_set
from tests.helpers.serving import METRICS_PORT, ServeApp

# Held-out items (never trained on) from `q3serve eval`'s set that the committed model answers
# correctly in thinking mode; how often it does so over the whole set is in benchmarks/results/eval.json.
QUESTIONS = [
    ("Add 4524 and 13.", "4537"),
    ("Compute 8887 - 5659.", "3228"),
    ("Put 26, 10, 15, 15, 63 in ascending order.", "10, 15, 15, 26, 63"),
    ("Mei has 24 coins. Mei gives 14 to Emma. Then Mei gives 4 to Emma. How many coins does Mei have now?", "6"),
]


# Held-out products (training/tool_use.py's eval set, never trained on) that the committed model
# answers right through the tool in both modes; how often it does over the set is in eval.json.
TOOL_TASKS = [tool_eval_set(30)[i] for i in (0, 7, 19)]


@pytest.fixture(scope="module")
def server(serve_app: ServeApp) -> str:
    return serve_app(config=AppConfig())  # as `q3serve up` serves it, not the test default


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)


def _ask(client: openai.OpenAI, question: str, **extra: object):  # noqa: ANN202
    return client.chat.completions.create(
        model="qwen3-moe", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=400,
        extra_body=extra,
    ).choices[0].message


@pytest.mark.parametrize(("question", "answer"), QUESTIONS)
def test_thinking_mode_answers_with_its_reasoning(client: openai.OpenAI, question: str, answer: str) -> None:
    msg = _ask(client, question)
    assert msg.content.strip() == answer
    reasoning = getattr(msg, "reasoning_content", None) or ""
    assert len(reasoning.splitlines()) >= 3 and answer in reasoning.splitlines()[-1]


@pytest.mark.parametrize(("question", "answer"), QUESTIONS)
def test_non_thinking_mode_answers_without_reasoning(client: openai.OpenAI, question: str, answer: str) -> None:
    for msg in (_ask(client, question, chat_template_kwargs={"enable_thinking": False}),
                _ask(client, question + " /no_think")):
        assert not getattr(msg, "reasoning_content", None)
        assert msg.content.strip() and "<think>" not in msg.content and "\n" not in msg.content.strip()


def test_budget_cuts_the_reasoning_and_an_answer_follows(client: openai.OpenAI) -> None:
    msg = _ask(client, QUESTIONS[0][0], thinking_budget=8)
    reasoning = getattr(msg, "reasoning_content", None) or ""
    assert "Considering the limited time by the user" in reasoning
    assert msg.content.strip().isdigit()


def _tool_kw(thinking: bool) -> dict:
    return dict(model="qwen3-moe", tools=[multiply_tool()], tool_choice="auto", temperature=0, max_tokens=300,
                extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})


@pytest.mark.parametrize("thinking", [False, True])
def test_agent_loop_with_the_openai_sdk(client: openai.OpenAI, thinking: bool) -> None:
    """tool_choice auto: the model calls the tool with the question's operands (finish_reason
    tool_calls), then answers from the tool's result; streamed, the call's deltas reassemble to
    the same call."""
    for task in TOOL_TASKS:
        a, b = operands(task)
        messages: list = [{"role": "user", "content": task.question}]
        first = client.chat.completions.create(messages=messages, **_tool_kw(thinking)).choices[0]
        assert first.finish_reason == "tool_calls", first.message
        (call,) = first.message.tool_calls
        assert call.function.name == "multiply" and json.loads(call.function.arguments) == {"a": a, "b": b}
        assert bool(getattr(first.message, "reasoning_content", None)) is thinking
        streamed: dict = {}
        for chunk in client.chat.completions.create(messages=messages, stream=True, **_tool_kw(thinking)):
            for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                entry = streamed.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
        assert [(c["name"], c["arguments"]) for c in streamed.values()] == [("multiply", call.function.arguments)]
        messages += [first.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": str(a * b)}]
        final = client.chat.completions.create(messages=messages, **_tool_kw(thinking)).choices[0]
        assert final.finish_reason == "stop" and not final.message.tool_calls
        assert final.message.content.strip() == task.answer


def test_agent_loop_with_langchain(server: str) -> None:
    """langchain-openai's bind_tools with a @tool function (its own schema layout), both modes."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    for thinking in (False, True):
        llm = ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model="qwen3-moe", temperature=0, max_tokens=300,
                         timeout=120, max_retries=0,
                         extra_body={"chat_template_kwargs": {"enable_thinking": thinking}}).bind_tools([multiply])
        for task in TOOL_TASKS:
            messages: list = [HumanMessage(task.question)]
            ai = llm.invoke(messages)
            assert [c["name"] for c in ai.tool_calls] == ["multiply"], ai
            assert ai.tool_calls[0]["args"] == dict(zip("ab", operands(task)))
            messages += [ai, ToolMessage(str(multiply.invoke(ai.tool_calls[0]["args"])), tool_call_id=ai.tool_calls[0]["id"])]
            final = llm.invoke(messages)
            assert not final.tool_calls and final.content.strip() == task.answer


def test_agent_loop_with_the_openai_agents_sdk(server: str) -> None:
    """The OpenAI Agents SDK with its default model class (the Responses API; it always sends
    include: []) runs a @function_tool loop to the right product, streamed and not, with every
    ModelSettings field this server honours set; one it cannot (truncation auto) is a 400 naming it."""
    import asyncio

    from agents import (Agent, ModelSettings, Runner, function_tool, set_default_openai_api,
                        set_default_openai_client, set_tracing_disabled)
    from openai import AsyncOpenAI, BadRequestError
    from openai.types.shared import Reasoning

    set_tracing_disabled(True)  # its traces go to OpenAI's servers

    @function_tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    settings = ModelSettings(temperature=0, top_p=1, max_tokens=300, parallel_tool_calls=False, truncation="disabled",
                             store=False, metadata={"suite": "q3serve"}, top_logprobs=1, reasoning=Reasoning(effort="low"))

    async def run() -> None:
        set_default_openai_client(AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120),
                                  use_for_tracing=False)
        set_default_openai_api("responses")
        for model_settings in (ModelSettings(), settings):
            agent = Agent(name="calculator", model="qwen3-moe", tools=[multiply], model_settings=model_settings)
            for task in TOOL_TASKS:
                result = await Runner.run(agent, task.question, max_turns=4)
                calls = [item.raw_item for item in result.new_items if item.type == "tool_call_item"]
                assert [(c.name, json.loads(c.arguments)) for c in calls] == [("multiply", dict(zip("ab", operands(task))))]
                assert result.final_output.strip() == task.answer
        streamed = Runner.run_streamed(Agent(name="calculator", model="qwen3-moe", tools=[multiply]),
                                       TOOL_TASKS[0].question, max_turns=4)
        async for _ in streamed.stream_events():
            pass
        assert streamed.final_output.strip() == TOOL_TASKS[0].answer
        refused = Agent(name="calculator", model="qwen3-moe", model_settings=ModelSettings(truncation="auto"))
        with pytest.raises(BadRequestError) as info:
            await Runner.run(refused, "hi", max_turns=1)
        assert info.value.body["param"] == "truncation"

    asyncio.run(asyncio.wait_for(run(), 600))


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_agent_loop_with_pydantic_ai(server: str, api: str) -> None:
    """pydantic-ai's Agent with a plain tool, on its chat and its Responses model classes."""
    from openai import AsyncOpenAI
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model_class = OpenAIChatModel if api == "chat" else OpenAIResponsesModel
    seen: list[tuple[int, int]] = []

    async def run(question: str) -> str:
        client = AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
        agent = Agent(model_class("qwen3-moe", provider=OpenAIProvider(openai_client=client)),
                      model_settings={"temperature": 0, "max_tokens": 300})

        @agent.tool_plain
        def multiply(a: int, b: int) -> int:
            """Multiply two integers."""
            seen.append((a, b))
            return a * b

        return (await agent.run(question)).output

    for task in TOOL_TASKS:
        seen.clear()
        assert asyncio_run(run(task.question)).strip() == task.answer
        assert seen == [operands(task)]


def asyncio_run(coro):  # noqa: ANN001, ANN201
    import asyncio

    return asyncio.run(asyncio.wait_for(coro, 600))


def test_eval_command(server: str, tmp_path: Path) -> None:
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    cmd = [sys.executable, "-m", "deployments.cli", "eval", "--url", server, "--per-task", "1", "--budgets", "0,32",
           "--concurrency", "4", "--tool-items", "3", "--out", str(out), "--plot", str(png),
           "--metrics-url", f"http://127.0.0.1:{METRICS_PORT['port']}/metrics"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(summary) == {"non-thinking", "thinking", "budget-0", "budget-32"}
    assert len(result["records"]) == 4 * 7
    assert summary["non-thinking"]["all"]["mean_reasoning_tokens"] == 0
    assert summary["thinking"]["all"]["mean_reasoning_tokens"] > summary["budget-0"]["all"]["mean_reasoning_tokens"]
    assert {r["pool"] for r in result["records"] if r["condition"] == "non-thinking"} == {"fast"}
    counts = result["expert_usage"]["counts"]
    assert counts["thinking"] and sum(map(sum, counts["thinking"])) > 0
    assert len(counts["thinking"]) == 6 and len(counts["thinking"][0]) == 16
    # The router learned uneven expert use: in every layer the busiest expert is well above the mean.
    assert all(layer["max_over_mean"] > 1.5 for layer in result["expert_usage"]["per_layer"]["thinking"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The tool task: 3 held-out products per mode, with the tool (the agent loop) and without.
    tools = result["tool_use"]
    assert set(tools) == {"non-thinking", "thinking"} and len(result["tool_records"]) == 3 * 4
    for mode in tools.values():
        assert mode["with_tool"]["called"] == 1.0 and mode["without_tool"]["called"] == 0.0
        assert mode["with_tool"]["accuracy"] > mode["without_tool"]["accuracy"]
