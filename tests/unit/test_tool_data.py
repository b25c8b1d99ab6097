"""Tool-use training data (training/tool_use.py) is what the server renders and parses: the call
target parses into the offered tool's call with the item's operands, the answer-stage prompt is the
server's own rendering of the messages an OpenAI client sends back, and the tool task's held-out
products are never trained on."""

from __future__ import annotations

import json
import random

import pytest

from cluster.engine.tokenizer import IM_END, THINK_END, load_tokenizer, render_chat
from deployments.api.openai_models import Message
from deployments.frontend.tool_calls import parse_tool_calls
from deployments.tools import tool_use
from training.data import TOOL_THINKING_SHARE, make_arith_example, make_tool_example
from deployments.tools.tasks import sample


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return load_tokenizer()


def _split(tok, ex) -> tuple[str, str]:  # noqa: ANN001
    prompt = tok.decode([t for t, learn in zip(ex.ids, ex.learn) if not learn])
    return prompt, tok.decode([t for t, learn in zip(ex.ids, ex.learn) if learn])


def _offered(prompt: str) -> list[dict]:
    block = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    return [json.loads(line) for line in block.splitlines()]


def test_call_target_parses_into_the_offered_tool(tok) -> None:  # noqa: ANN001
    rng = random.Random(3)
    thinking_seen = set()
    for _ in range(60):
        task = tool_use.big_mul(rng, held_out=False)
        ex = make_tool_example(rng, tok, task, "tool_call")
        prompt, target = _split(tok, ex)
        assert all(ex.learn[ex.learn.index(True):])  # the prompt is never learned, the target whole
        thinking = target.startswith("<think>\n") and "</think>\n\n" in target
        thinking_seen.add(thinking)
        if not thinking:
            assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        answer = target.split("</think>\n\n", 1)[1] if thinking else target
        assert answer.endswith("<|im_end|>")
        rest, calls = parse_tool_calls(answer.removesuffix("<|im_end|>"))
        assert rest is None and len(calls) == 1
        mul = [t["function"] for t in _offered(prompt) if t["function"]["name"] in tool_use.NAMES]
        assert len(mul) == 1 and calls[0]["function"]["name"] == mul[0]["name"]
        params = list(mul[0]["parameters"]["properties"])
        assert json.loads(calls[0]["function"]["arguments"]) == dict(zip(params, tool_use.operands(task)))
    assert thinking_seen == {True, False}


def test_answer_prompt_is_the_servers_rendering_of_the_clients_messages(tok) -> None:  # noqa: ANN001
    rng = random.Random(4)
    for _ in range(40):
        task = tool_use.big_mul(rng, held_out=False)
        state = rng.getstate()
        ex = make_tool_example(rng, tok, task, "tool_answer")
        rng.setstate(state)  # replay the draws make_tool_example made
        tools, name, params = tool_use.random_tools(rng)
        thinking = rng.random() < TOOL_THINKING_SHARE
        reasoning = tool_use.call_thought(task, name, params) if thinking and rng.random() < 0.5 else None
        sent = [Message.model_validate(m).model_dump(exclude_none=True)
                for m in tool_use.conversation(task, name, params, reasoning)]
        served = render_chat(tok, sent, enable_thinking=thinking, tools=tools)
        prompt, target = _split(tok, ex)
        assert prompt == served
        assert f"<tool_response>\n{task.answer}\n</tool_response>" in prompt
        assert target.endswith(f"{task.answer}<|im_end|>")
        assert (target.startswith("<think>\n") and THINK_END in ex.ids) is thinking


def test_other_tasks_with_tools_offered_are_answered_directly(tok) -> None:  # noqa: ANN001
    rng = random.Random(5)
    for _ in range(30):
        task = sample(rng, held_out=False)
        ex = make_tool_example(rng, tok, task, "tool_other")
        prompt, target = _split(tok, ex)
        assert "# Tools" in prompt and "<tool_call>" not in target
        assert target.endswith(f"{task.answer}<|im_end|>")


def test_tool_items_held_out_split() -> None:
    rng = random.Random(6)
    train_keys = {tool_use.big_mul(rng, held_out=False).key for _ in range(3000)}
    held = {t.key for t in tool_use.tool_eval_set(50)}
    assert len(held) == 50 and not train_keys & held
    for t in tool_use.tool_eval_set(50):
        a, b = tool_use.operands(t)
        assert t.answer == str(a * b) and 100 <= a <= 9999 and 10 <= b <= 999
        assert str(a) in t.question and str(b) in t.question


def test_run_multiply_executes_only_a_well_formed_call() -> None:
    tool = tool_use.multiply_tool("times", ("x", "y"))
    assert tool_use.run_multiply("times", '{"x": 1234, "y": 56}', tool) == "69104"
    assert tool_use.run_multiply("multiply", '{"x": 1, "y": 2}', tool).startswith("error")
    assert tool_use.run_multiply("times", '{"a": 1, "b": 2}', tool).startswith("error")
    assert tool_use.run_multiply("times", '{"x": "1", "y": 2}', tool).startswith("error")
    assert tool_use.run_multiply("times", "not json", tool).startswith("error")


@pytest.mark.parametrize("style", ["openai", "langchain", "pydantic"])
def test_tool_layouts_are_accepted_by_the_server(style: str) -> None:
    from deployments.frontend.tool_calls import check_tools

    check_tools([tool_use.multiply_tool(style=style)], "auto")


@pytest.fixture(scope="module")
def grammars(tok):  # noqa: ANN001, ANN201
    from cluster.engine.structured import GrammarCompiler

    return GrammarCompiler(tok, 151936, [IM_END, 151643])


def _accepted(grammars, so, ids: list[int]) -> bool:  # noqa: ANN001
    """The ids (ending in <|im_end|>) are what the server's grammar allows, and complete it."""
    c = grammars.constraint(so, "active")
    return all(c.accept(t) for t in ids) and c.done


def test_arith_call_is_what_the_grammar_forces_and_learns_only_the_rest(tok, grammars) -> None:  # noqa: ANN001
    """tool_choice required / named on an add or subtract tool: the target parses into the call with
    the item's operands, the server's tool-call grammar accepts it (thinking: right after </think>),
    and what the grammar writes (`<tool_call>`, the name when forced, the first key) is not learned:
    the learned part starts at the first operand (or at the name, when the model picks the tool)."""
    from deployments.frontend.tool_calls import check_tools

    rng = random.Random(21)
    seen = set()
    for _ in range(80):
        op = rng.choice("+-")
        task = tool_use.arith_item(rng, held_out=False, op=op)
        state = rng.getstate()
        ex = make_arith_example(rng, tok, task, "arith_call")
        rng.setstate(state)
        tools, name, params, named = tool_use.arith_tools(rng, op)
        thinking = rng.random() < TOOL_THINKING_SHARE
        rng.setstate(state)
        make_arith_example(rng, tok, task, "arith_call")  # leave rng where the example left it
        use = check_tools(tools, {"type": "function", "function": {"name": name}} if named else "required")
        served = render_chat(tok, [{"role": "user", "content": task.question}], enable_thinking=thinking,
                             tools=use.for_template())
        prompt_ids = tok.encode(served, add_special_tokens=False)
        assert ex.ids[:len(prompt_ids)] == prompt_ids and not any(ex.learn[:len(prompt_ids)])
        target = ex.ids[len(prompt_ids):]
        learn = ex.learn[len(prompt_ids):]
        answer = target[target.index(THINK_END) + 1:] if thinking else target
        assert (THINK_END in target) is thinking and target[-1] == IM_END
        assert _accepted(grammars, use.constraint(None, False), answer)
        text = tok.decode(answer[:-1])
        assert not text.startswith("\n")  # the grammar starts right after </think>
        rest, calls = parse_tool_calls(text)
        _, a, b = tool_use.arith_operands(task)
        assert rest is None and calls[0]["function"]["name"] == name
        assert json.loads(calls[0]["function"]["arguments"]) == dict(zip(params, (a, b)))
        first = len(answer) - sum(learn[len(target) - len(answer):])  # first learned id of the call
        assert not any(learn[len(target) - len(answer):][:first]) and all(learn[len(target) - len(answer) + first:])
        unlearned = tok.decode(answer[:first])
        if named:
            assert unlearned == f'<tool_call>\n{{"name": "{name}", "arguments": {{"{params[0]}":'
        else:
            assert unlearned == '<tool_call>\n{"name": "'
        assert all(learn[:len(target) - len(answer)])  # the thought is learned
        seen.add((thinking, named, len(tools) > 1, op, task.key.startswith("small:")))
    assert {s[0] for s in seen} == {True, False} and {s[1] for s in seen} == {True, False}
    assert {s[3] for s in seen} == {"+", "-"} and {s[4] for s in seen} == {True, False}


def test_arith_answer_prompt_is_the_servers_rendering(tok) -> None:  # noqa: ANN001
    rng = random.Random(22)
    for _ in range(30):
        task = tool_use.arith_item(rng, held_out=False, op="+")
        state = rng.getstate()
        ex = make_arith_example(rng, tok, task, "arith_answer")
        rng.setstate(state)
        tools, name, params, _ = tool_use.arith_tools(rng, "+")
        thinking = rng.random() < TOOL_THINKING_SHARE
        reasoning = tool_use.arith_call_thought(task, name) if thinking and rng.random() < 0.5 else None
        sent = [Message.model_validate(m).model_dump(exclude_none=True)
                for m in tool_use.arith_conversation(task, name, params, reasoning)]
        prompt, target = _split(tok, ex)
        assert prompt == render_chat(tok, sent, enable_thinking=thinking, tools=tools)
        assert f"<tool_response>\n{task.answer}\n</tool_response>" in prompt
        assert target.endswith(f"{task.answer}<|im_end|>") and all(ex.learn[ex.learn.index(True):])


def test_arith_items_held_out_split() -> None:
    from deployments.tools.tasks import is_held_out

    held = tool_use.add_eval_set(30)
    assert len({t.key for t in held}) == 30 and all(is_held_out(t.key) for t in held)
    assert sum(t.key.startswith("small:") for t in held) == 15  # the small task's own held-out items
    rng = random.Random(23)
    train = {tool_use.arith_item(rng, False, rng.choice("+-")).key for _ in range(4000)}
    assert not any(is_held_out(k) for k in train) and not train & {t.key for t in held}
    for t in held:
        op, a, b = tool_use.arith_operands(t)
        assert op == "+" and t.answer == str(a + b) and str(a) in t.question and str(b) in t.question
    tool = tool_use.multiply_tool("add", ("a", "b"), "Add two integers.")
    assert tool_use.run_integer_tool("add", '{"a": 123456, "b": 7}', tool, "+") == "123463"
    assert tool_use.run_integer_tool("add", '{"a": 9, "b": 7}', tool, "-") == "2"
    assert tool_use.run_integer_tool("add", '{"x": 9, "b": 7}', tool, "+").startswith("error")
