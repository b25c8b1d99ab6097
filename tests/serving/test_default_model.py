"""The committed default model served as `q3serve up` serves it (AppConfig() with no model):
fixed questions answered correctly in thinking mode with the reasoning shown, and answered
without reasoning in non-thinking mode; `q3serve eval` against the same server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from deployments.config import AppConfig
from tests.serving.conftest import METRICS_PORT, start_app, stop_app

# Held-out items (never trained on) from `q3serve eval`'s set that the committed model answers
# correctly in thinking mode; how often it does so over the whole set is in benchmarks/results/eval.json.
QUESTIONS = [
    ("Add 4524 and 13.", "4537"),
    ("Compute 8887 - 5659.", "3228"),
    ("Put 26, 10, 15, 15, 63 in ascending order.", "10, 15, 15, 26, 63"),
    ("Ann has 19 marbles. Ann wins 28 more. Then Ann uses 35. How many marbles does Ann have now?", "12"),
]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    base = start_app(AppConfig())
    yield base
    stop_app()


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


def test_eval_command(server: str, tmp_path: Path) -> None:
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    cmd = [sys.executable, "-m", "deployments.cli", "eval", "--url", server, "--per-task", "1", "--budgets", "0,32",
           "--concurrency", "4", "--out", str(out), "--plot", str(png),
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
