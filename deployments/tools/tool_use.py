"""Tool use in Qwen3's format: a multiplication tool offered in `tools`, for products too large
to work out in the head (3-4 digits times 2-3 digits).

An agent loop is two assistant turns, and each is one training example:
- call:   the tools' system section and the question; target (optionally after a short thought)
          `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.
- answer: the same conversation plus the call and the `<tool_response>` turn; target the number the
          tool returned (copied, after a short thought in thinking mode).
Rendered by Qwen3's own template, as the server renders a request with `tools`, so the ids match
what is served. The tool's name, parameter names and description vary, and unrelated tools are
sometimes offered beside it, so the model learns to read the offered signature rather than one
fixed spelling. With tools offered and a question that is not a multiplication, the model answers
as usual (`other` examples), which is what `tool_choice` auto needs.
"""

from __future__ import annotations

import json
import random
from typing import Any

from deployments.tools.tasks import Task, _number, distinct, is_held_out

NAMES = ("multiply", "multiply", "Multiply", "mul", "times", "multiply_numbers", "calculator_multiply", "product")
PARAMS = (("a", "b"), ("a", "b"), ("x", "y"), ("first", "second"), ("left", "right"))
DESCRIPTIONS = ("Multiply two integers.", "Multiply two numbers and return the product.",
                "Returns the product of two integers.", "Multiply a by b.", "", "Exact integer multiplication.")
OTHER_TOOLS = (
    {"name": "get_weather", "description": "Get the current weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "search", "description": "Search the web.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
    {"name": "add", "description": "Add two integers.",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"]}},
    {"name": "get_time", "description": "The current time.", "parameters": {"type": "object", "properties": {}}},
)


def multiply_tool(name: str = "multiply", params: tuple[str, str] = ("a", "b"),
                  description: str = "Multiply two integers.", style: str = "openai") -> dict[str, Any]:
    """An OpenAI `tools` entry for the multiplication tool, its JSON laid out as clients lay it
    out (Qwen3's template prints it in the client's key order): `openai` as written by hand from
    OpenAI's docs, `langchain` as bind_tools / convert_to_openai_tool, `pydantic` as the openai
    SDK's pydantic_function_tool (strict, titles)."""
    props = {p: {"type": "integer"} for p in params}
    desc = {"description": description} if description else {}
    if style == "langchain":
        fn: dict[str, Any] = {"name": name, **desc,
                              "parameters": {"properties": props, "required": list(params), "type": "object"}}
    elif style == "pydantic":
        props = {p: {"title": p.title(), "type": "integer"} for p in params}
        fn = {"name": name, "strict": True,
              "parameters": {**desc, "properties": props, "required": list(params), "title": name,
                             "type": "object", "additionalProperties": False},
              **desc}
    else:
        fn = {"name": name, **desc, "parameters": {"type": "object", "properties": props, "required": list(params)}}
    return {"type": "function", "function": fn}


def random_tools(rng: random.Random) -> tuple[list[dict], str, tuple[str, str]]:
    """A tools list holding one multiplication tool, sometimes with unrelated tools around it."""
    name, params = rng.choice(NAMES), rng.choice(PARAMS)
    style = rng.choice(("openai", "langchain", "pydantic"))
    tools = [multiply_tool(name, params, rng.choice(DESCRIPTIONS), style)]
    if rng.random() < 0.35:
        others = [{"type": "function", "function": t} for t in rng.sample(OTHER_TOOLS, rng.randint(1, 2))]
        tools = others + tools if rng.random() < 0.5 else tools + others
    return tools, name, params


def big_mul(rng: random.Random, held_out: bool) -> Task:
    """A product beyond the model's head (the `mul` task is 2-3 digits times one digit)."""
    while True:
        a, b = _number(rng, 3, 4), _number(rng, 2, 3)
        key = f"tool:{a}:{b}"
        if is_held_out(key) == held_out:
            break
    q = rng.choice([
        "What is {a} * {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}.", "What is {a} times {b}?",
        "{a} * {b} = ?", "What is the product of {a} and {b}?", "Calculate {a} x {b}.",
    ]).format(a=a, b=b)
    return Task("tool", key, q, f"{a} * {b} is too large to do in my head, so I use the tool.", str(a * b))


def operands(task: Task) -> tuple[int, int]:
    _, a, b = task.key.split(":")
    return int(a), int(b)


def arguments(task: Task, params: tuple[str, str]) -> dict[str, int]:
    """The call's arguments: the item's operands under the offered tool's parameter names."""
    return dict(zip(params, operands(task)))


def call_text(task: Task, name: str, params: tuple[str, str]) -> str:
    """The assistant's call as Qwen3 writes it (json.dumps spacing = the template's tojson)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments(task, params)}) + "\n</tool_call>"


def call_thought(task: Task, name: str, params: tuple[str, str]) -> str:
    a, b = operands(task)
    return f"The user asks for {a} * {b}.\nThat is too large to do in my head, so I call {name} with {params[0]} = {a} and {params[1]} = {b}."


def answer_thought(task: Task, name: str) -> str:
    a, b = operands(task)
    return f"{name} returned {task.answer}.\nSo {a} * {b} = {task.answer}."


def conversation(task: Task, name: str, params: tuple[str, str], reasoning: str | None) -> list[dict]:
    """The messages after the call and its result, as an OpenAI client sends them back."""
    return called(task, name, arguments(task, params), reasoning)


def called(task: Task, name: str, args: dict[str, int], reasoning: str | None) -> list[dict]:
    """The question, the assistant's call of `name` with `args` (and its reasoning) and the tool's
    result, the task's answer: any tool's conversation after one call."""
    call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    assistant: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": [call]}
    if reasoning is not None:
        assistant["reasoning_content"] = reasoning
    return [{"role": "user", "content": task.question}, assistant,
            {"role": "tool", "tool_call_id": "call_0", "content": task.answer}]


def tool_eval_set(n: int, seed: int = 1234) -> list[Task]:
    """The fixed held-out products of `q3serve eval`'s tool task (never trained on)."""
    rng = random.Random(seed)
    return distinct(lambda: big_mul(rng, held_out=True), n)


def run_multiply(name: str, arguments: str, tool: dict[str, Any]) -> str:
    """Executes a call of `tool` as a client's tool runner would: the product of the two integer
    arguments, or an error text for a wrong name or wrong arguments."""
    fn = tool["function"]
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return "error: arguments are not JSON"
    params = list(fn["parameters"]["properties"])
    if name != fn["name"] or not isinstance(args, dict) or sorted(args) != sorted(params):
        return f"error: call {fn['name']} with integer arguments {', '.join(params)}"
    a, b = (args[p] for p in params)
    if not (isinstance(a, int) and isinstance(b, int)):
        return "error: the arguments must be integers"
    return str(a * b)


# Addition and subtraction tools with unbounded integer parameters, called under `tool_choice`
# "required" or named, where the grammar forces `<tool_call>` and (one tool, or a named one) the
# name and the first parameter's key: the model writes the operands and closes the call. Items
# with single-digit operands are the `small` task's own items (same keys, same held-out split), so
# no held-out `small` question is ever trained on with a tool either.
ARITH_NAMES = {"+": ("add", "add", "add", "add_numbers", "Add", "sum_numbers", "plus"),
               "-": ("subtract", "subtract", "sub", "minus", "subtract_numbers")}
ARITH_DESCRIPTIONS = {"+": ("Add two integers.", "Add two numbers and return the sum.", "Returns a + b.", ""),
                      "-": ("Subtract the second integer from the first.", "Subtract two numbers.", "Returns a - b.", "")}
ARITH_KINDS = {"+": "tool_add", "-": "tool_sub"}


def arith_item(rng: random.Random, held_out: bool, op: str = "+", small_operands: bool | None = None) -> Task:
    """An addition (op "+") or subtraction ("-", never negative) for an arithmetic tool: single-digit
    operands (the `small` task's items) or 2-5 digits and 1-5 digits. Key `space:op:a:b:phrasing`."""
    from deployments.tools.tasks import SMALL_PHRASINGS, small_task

    small_operands = rng.random() < 0.4 if small_operands is None else small_operands
    while True:
        if small_operands:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
        else:
            a, b = _number(rng, 2, 5), _number(rng, 1, 5)
        if op == "-" and a < b:
            a, b = b, a
        t = small_task(op, a, b, rng.randrange(len(SMALL_PHRASINGS[op])))
        key = t.key if small_operands else t.key.replace("small:", "arith:", 1)
        if is_held_out(key) == held_out:
            break
    return Task(ARITH_KINDS[op], key, t.question, f"I call the tool with {a} and {b}.", t.answer)


def arith_operands(task: Task) -> tuple[str, int, int]:
    _, op, a, b, _ = task.key.split(":")
    return op, int(a), int(b)


def arith_tools(rng: random.Random, op: str) -> tuple[list[dict], str, tuple[str, str], bool]:
    """The offered tools for an `op` item: its tool alone, or beside the other arithmetic tool or
    other tools; and whether the grammar forces the name (one tool, or tool_choice naming it)."""
    name, params = rng.choice(ARITH_NAMES[op]), rng.choice(PARAMS)
    style = rng.choice(("openai", "langchain", "pydantic"))
    tools = [multiply_tool(name, params, rng.choice(ARITH_DESCRIPTIONS[op]), style)]
    r = rng.random()
    if r < 0.2:
        other = "-" if op == "+" else "+"
        tools.append(multiply_tool(ARITH_NAMES[other][0], params, ARITH_DESCRIPTIONS[other][0], style))
    elif r < 0.3:
        tools.append(multiply_tool("multiply", params, DESCRIPTIONS[0], style))
    elif r < 0.4:
        tools.append({"type": "function", "function": rng.choice([t for t in OTHER_TOOLS if t["name"] != "add"])})
    if rng.random() < 0.5:
        rng.shuffle(tools)
    named = len(tools) == 1 or rng.random() < 0.5
    return tools, name, params, named


def arith_call_text(task: Task, name: str, params: tuple[str, str]) -> str:
    _, a, b = arith_operands(task)
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": dict(zip(params, (a, b)))}) + "\n</tool_call>"


def arith_call_thought(task: Task, name: str) -> str:
    """One short line: a thinking-mode call fits well inside 64 tokens."""
    _, a, b = arith_operands(task)
    return f"I call {name} with {a} and {b}."


def arith_answer_thought(task: Task, name: str) -> str:
    op, a, b = arith_operands(task)
    return f"{name} returned {task.answer}.\nSo {a} {op} {b} = {task.answer}."


def arith_conversation(task: Task, name: str, params: tuple[str, str], reasoning: str | None) -> list[dict]:
    """The messages after the call and its result, as an OpenAI client sends them back."""
    _, a, b = arith_operands(task)
    return called(task, name, dict(zip(params, (a, b))), reasoning)


def add_eval_set(n: int, seed: int = 1234) -> list[Task]:
    """The add tool's held-out items of `q3serve eval`: n // 2 with single-digit operands, the rest
    with 2-5 and 1-5 digits (never trained on)."""
    rng = random.Random(seed)
    return (distinct(lambda: arith_item(rng, True, "+", True), n // 2)
            + distinct(lambda: arith_item(rng, True, "+", False), n - n // 2))


def run_integer_tool(name: str, arguments: str, tool: dict[str, Any], op: str) -> str:
    """Executes a call of an arithmetic tool (`op` one of + - *) as a client's tool runner would,
    or an error text for a wrong name or wrong arguments."""
    if op == "*":
        return run_multiply(name, arguments, tool)
    product = run_multiply(name, arguments, tool)
    if product.startswith("error"):
        return product
    a, b = (json.loads(arguments)[p] for p in tool["function"]["parameters"]["properties"])
    return str(a + b if op == "+" else a - b)
