"""What a newcomer tries first, on the committed default model served as `q3serve up` serves it:
single-digit arithmetic and a greeting or an off-task question (the fixed answer saying what the
model can do), in both modes; and the everyday structured calls through the official SDK,
langchain-openai and instructor with schemas that bound nothing (JSON mode, `json_schema`,
`with_structured_output`, `tool_choice` required and named): valid, schema-conforming output that
ends well inside 64 tokens, on held-out questions (never trained on), in both modes."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

from deployments.config import AppConfig
from deployments.tools.tasks import CHAT_ANSWER, eval_set
from tests.helpers.serving import ServeApp

MODEL = "qwen3-moe"
HELD_OUT = eval_set(6, kinds=("small",))  # single-digit questions, phrasings never trained on
ADDITIONS = [t for t in eval_set(12, kinds=("small",)) if t.key.startswith("small:+:")]  # for the add tool
# Held-out single-digit questions the committed model answers right in both modes (over the whole
# held-out set it does in 0.87 of them thinking, 0.50 not: benchmarks/results/eval.json), and
# greetings / off-task questions, held-out ones included, which get the fixed sentence in both.
ANSWERED = [("What is 2 + 3?", "5"), *[(t.question, t.answer) for t in eval_set(12, kinds=("small",))
                                       if t.question in ("0 * 4", "5 * 4", "How much is 7 plus 1?", "9 - 4 = ?")],
            ("Hello! Who are you?", CHAT_ANSWER), ("What's the weather like today?", CHAT_ANSWER),
            *[(t.question, t.answer) for t in eval_set(4, kinds=("chat",))]]
MODES = {"thinking": True, "non-thinking": False}


class Answer(BaseModel):
    answer: int  # no bounds: the model has to close the number itself


ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


@pytest.fixture(scope="module")
def server(serve_app: ServeApp) -> str:
    return serve_app(config=AppConfig())


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)


def _kw(thinking: bool, **extra: object) -> dict:
    return dict(model=MODEL, temperature=0, max_tokens=64,
                extra_body={"chat_template_kwargs": {"enable_thinking": thinking}, **extra})


@pytest.mark.parametrize("mode", MODES)
def test_single_digits_and_a_greeting(client: openai.OpenAI, mode: str) -> None:
    assert len(ANSWERED) == 11
    for question, answer in ANSWERED:
        msg = client.chat.completions.create(messages=[{"role": "user", "content": question}],
                                             **_kw(MODES[mode])).choices[0].message
        assert msg.content.strip().rstrip(".") == answer.rstrip("."), (question, msg)
        assert bool(getattr(msg, "reasoning_content", None)) is MODES[mode]


def _done(choice) -> None:  # noqa: ANN001
    assert choice.finish_reason in ("stop", "tool_calls"), choice  # not "length": it closed within 64 tokens


@pytest.mark.parametrize("mode", MODES)
def test_json_mode_and_schema_with_the_sdk(client: openai.OpenAI, mode: str) -> None:
    import jsonschema

    for task in HELD_OUT:
        messages = [{"role": "user", "content": task.question}]
        obj = client.chat.completions.create(messages=messages, response_format={"type": "json_object"},
                                             **_kw(MODES[mode])).choices[0]
        _done(obj)
        assert isinstance(json.loads(obj.message.content), dict)
        parsed = client.chat.completions.parse(messages=messages, response_format=Answer, **_kw(MODES[mode])).choices[0]
        _done(parsed)
        assert isinstance(parsed.message.parsed, Answer)
        jsonschema.validate(json.loads(parsed.message.content), Answer.model_json_schema())


@pytest.mark.parametrize("mode", MODES)
def test_tool_choice_required_and_named(client: openai.OpenAI, mode: str) -> None:
    """An `add` tool forced on held-out additions: the call's integers close within 64 tokens."""
    cut = []
    assert len(ADDITIONS) >= 5
    for task in ADDITIONS:
        for choice in ("required", {"type": "function", "function": {"name": "add"}}):
            out = client.chat.completions.create(messages=[{"role": "user", "content": task.question}], tools=[ADD_TOOL],
                                                 tool_choice=choice, **_kw(MODES[mode])).choices[0]
            if out.finish_reason == "length":
                cut.append((task.question, str(choice)))
                continue
            (call,) = out.message.tool_calls
            args = json.loads(call.function.arguments)
            assert call.function.name == "add" and set(args) == {"a", "b"}
            assert sorted(args.values()) == sorted(map(int, task.key.split(":")[2:4]))  # the question's operands
    assert cut == [], cut


@pytest.mark.parametrize("mode", MODES)
def test_langchain_and_instructor_structured_output(server: str, mode: str) -> None:
    import instructor
    from langchain_openai import ChatOpenAI

    thinking = MODES[mode]
    body = {"chat_template_kwargs": {"enable_thinking": thinking}}
    for method in ("json_schema", "function_calling", "json_mode"):
        llm = ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=64,
                         timeout=120, max_retries=0, extra_body=body)
        structured = llm.with_structured_output(Answer, method=method)
        for task in HELD_OUT[:3]:
            assert isinstance(structured.invoke(task.question), Answer), (method, task.question)
    for mode_ in (instructor.Mode.TOOLS, instructor.Mode.JSON):
        client = instructor.from_openai(openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120,
                                                      max_retries=0), mode=mode_)
        for task in HELD_OUT[:3]:
            got = client.chat.completions.create(model=MODEL, response_model=Answer, max_retries=0, temperature=0,
                                                 max_tokens=64, extra_body=body,
                                                 messages=[{"role": "user", "content": task.question}])
            assert isinstance(got, Answer), (mode_, task.question)
