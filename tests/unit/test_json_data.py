"""JSON answers in the training data (training/data.py, deployments/tools/json_answers.py) are what
the server's grammar allows, and teach only what the model must choose: asked for in the prompt,
all of `{"answer": 5}` is learned; forced by the grammar alone (response_format json_object /
json_schema, a named structured-output tool), the forced opening `{"key":` is not, so the model
never starts JSON unasked. And the JSON case's scoring (shared with `q3serve eval`)."""

from __future__ import annotations

import json
import random

import pytest

from cluster.config import StructuredOutput
from cluster.engine.tokenizer import IM_END, THINK_END, load_tokenizer
from deployments.tools import json_answers
from deployments.tools.tasks import CHAT_ANSWER, NEW_KINDS, sample
from training.data import JSON_KINDS, MODES, NEW_MODES, SHORT_MODES, make_json_example, random_example


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return load_tokenizer()


@pytest.fixture(scope="module")
def grammars(tok):  # noqa: ANN001, ANN201
    from cluster.engine.structured import GrammarCompiler

    return GrammarCompiler(tok, 151936, [IM_END, 151643])


def _accepted(grammars, so: StructuredOutput, ids: list[int]) -> bool:  # noqa: ANN001
    c = grammars.constraint(so, "active")
    return all(c.accept(t) for t in ids) and c.done


def _draw(rng: random.Random, tok, mode: str):  # noqa: ANN001, ANN202
    kind = rng.choices(list(JSON_KINDS), weights=list(JSON_KINDS.values()))[0]
    task = sample(rng, held_out=False, kind=kind)
    return task, make_json_example(rng, tok, task, mode)


def _answer_part(tok, ex) -> tuple[list[int], list[bool], bool]:  # noqa: ANN001
    """The ids after the last </think>: the model's (thinking), or the template's empty block's,
    then its "\n\n" (non-thinking); their learn flags; whether the model thought."""
    i = len(ex.ids) - 1 - ex.ids[::-1].index(THINK_END)
    if ex.learn[i]:
        return ex.ids[i + 1:], ex.learn[i + 1:], True
    assert tok.decode([ex.ids[i + 1]]) == "\n\n"
    return ex.ids[i + 2:], ex.learn[i + 2:], False


def test_forced_json_learns_the_value_and_the_close_not_the_opening(tok, grammars) -> None:  # noqa: ANN001
    rng = random.Random(31)
    seen = set()
    for _ in range(120):
        task, ex = _draw(rng, tok, "json_forced")
        ids, learn, thinking = _answer_part(tok, ex)
        text = tok.decode(ids[:-1])
        data = json.loads(text)
        (key, v), = data.items()
        assert v == json_answers.value(task) and text == json.dumps(data)
        first = learn.index(True)
        assert tok.decode(ids[:first]) == f'{{"{key}":' and all(learn[first:]) and ids[-1] == IM_END
        # what a client sends: the question alone (maybe a generic system message); nothing asks for JSON
        prompt = tok.decode(ex.ids[:len(ex.ids) - len(ids)])
        assert "json" not in prompt.lower() and task.question in prompt
        # the server's grammars accept it: json_object, and json_schema with the key and the value's type
        assert _accepted(grammars, StructuredOutput("json_object", "", "response_format"), ids)
        schema = json_answers.schema(key, v)
        assert _accepted(grammars, StructuredOutput("json_schema", json.dumps(schema), "response_format"), ids)
        if thinking:  # the grammar starts right after </think>: no "\n\n" between
            assert all(learn_ for learn_ in ex.learn[ex.learn.index(True):len(ex.ids) - len(ids)])
        else:
            assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        seen.add((thinking, type(v).__name__))
    assert {s[0] for s in seen} == {True, False} and {s[1] for s in seen} == {"int", "list", "str"}


def test_prompted_json_is_learned_whole(tok, grammars) -> None:  # noqa: ANN001
    rng = random.Random(32)
    styles = set()
    for _ in range(150):
        task, ex = _draw(rng, tok, "json")
        start = ex.learn.index(True)
        assert all(ex.learn[start:])
        prompt, target = tok.decode(ex.ids[:start]), tok.decode(ex.ids[start:])
        assert "json" in prompt.lower()
        body = target.split("</think>", 1)[-1].removesuffix("<|im_end|>")
        if body.lstrip("\n").startswith("```json\n"):
            assert json_answers.INSTRUCTOR_MD_JSON_USER in prompt and body.endswith("\n```")
            body = body.lstrip("\n").removeprefix("```json\n").removesuffix("\n```")
            styles.add("md_json")
        else:
            styles.add("instructor" if "As a genius expert" in prompt else "instruction")
        (key, v), = json.loads(body.lstrip("\n")).items()
        assert v == json_answers.value(task)
        assert key == "answer" or f'"{key}"' in prompt  # a key other than the default comes from the prompt
        if not body.startswith("\n"):  # a grammar applies: the server's json_object grammar accepts it
            ids = tok.encode(body, add_special_tokens=False) + [IM_END]
            assert _accepted(grammars, StructuredOutput("json_object", "", "response_format"), ids)
    assert styles == {"md_json", "instructor", "instruction"}


def test_structured_output_tool_forced_through_the_key(tok, grammars) -> None:  # noqa: ANN001
    from deployments.frontend.tool_calls import check_tools, parse_tool_calls

    rng = random.Random(33)
    for _ in range(40):
        task, ex = _draw(rng, tok, "json_tool")
        ids, learn, thinking = _answer_part(tok, ex)
        prompt = tok.decode(ex.ids[:len(ex.ids) - len(ids)])
        offered = [json.loads(line) for line in prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].splitlines()]
        assert len(offered) == 1 and "Correctly extracted" in offered[0]["function"]["description"]
        name = offered[0]["function"]["name"]
        use = check_tools(offered, {"type": "function", "function": {"name": name}})
        assert _accepted(grammars, use.constraint(None, False), ids)
        rest, calls = parse_tool_calls(tok.decode(ids[:-1]))
        (key, v), = json.loads(calls[0]["function"]["arguments"]).items()
        assert rest is None and v == json_answers.value(task)
        first = learn.index(True)
        assert tok.decode(ids[:first]) == f'<tool_call>\n{{"name": "{name}", "arguments": {{"{key}":'
        assert all(learn[first:])


def test_instructor_system_message_is_instructors_own() -> None:
    pytest.importorskip("instructor")
    from pydantic import BaseModel
    from instructor.v2.providers.openai.handlers import OpenAIJSONHandler, OpenAIToolsHandler

    class Answer(BaseModel):
        answer: int

    _, kw = OpenAIJSONHandler().prepare_request(Answer, {"messages": [{"role": "user", "content": "What is 2 + 3?"}]})
    assert kw["messages"][0]["content"] == json_answers.instructor_system(json_answers.schema("answer", 5))
    assert kw["response_format"] == {"type": "json_object"}
    _, kw = OpenAIToolsHandler().prepare_request(Answer, {"messages": [{"role": "user", "content": "What is 2 + 3?"}]})
    assert kw["tools"] == [json_answers.schema_tool(json_answers.schema("answer", 5))]


def test_the_mix() -> None:
    assert sum(MODES.values()) == pytest.approx(1.0, abs=1e-4)
    # Short examples, small shares: most of the time stays with the old mix. 8.1% of examples (~9%
    # of tokens) since the add tool's examples went from 0.7% to 2% (at 0.7% a run copied the
    # wrong operand).
    assert sum(NEW_MODES.values()) <= 0.1
    rng = random.Random(34)
    tok_ = load_tokenizer()
    drawn = [random_example(rng, tok_) for _ in range(3000)]
    for kind in NEW_KINDS:
        assert {e.mode for e in drawn if e.kind == kind} >= set(SHORT_MODES)
    assert {e.mode for e in drawn} >= set(MODES) - {"small", "chat"}


def test_json_case_scoring() -> None:
    small = sample(random.Random(1), held_out=True, kind="small")
    n = int(small.answer)
    assert json_answers.parse(f'{{"answer": {n}}}', small, "answer") == {"parsed": True, "conforms": True, "correct": True}
    assert json_answers.parse(f'{{"result": {n}}}', small, None)["correct"]
    assert not json_answers.parse(f'{{"result": {n}}}', small, "answer")["conforms"]
    assert json_answers.parse(f'{{"answer": "{n}"}}', small, "answer")["conforms"] is False
    assert json_answers.parse('{"answer": ' + "9" * 60, small, "answer")["parsed"] is False
    assert json_answers.parse(f'{{"answer": {n + 1}}}', small, "answer") == {"parsed": True, "conforms": True, "correct": False}
    chat = sample(random.Random(1), held_out=True, kind="chat")
    assert json_answers.parse(json.dumps({"answer": CHAT_ANSWER}), chat, "answer")["correct"]
