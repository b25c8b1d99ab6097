"""Answers as JSON objects, `{"answer": 5}`, as clients ask for them: by instruction in the prompt
(a system message like instructor's JSON modes, which put the schema there, or a line such as
"Answer in JSON."), or only by a grammar the server applies (`response_format` json_object /
json_schema, or a structured-output tool under a named `tool_choice`, as instructor's default TOOLS
mode sends), which adds nothing to the prompt. Shared by training (training/data.py) and
`q3serve eval`'s JSON case (evaluate_tools.py).

The value is the task's answer: an integer for numeric kinds, a list of integers for `sort`, the
fixed sentence (a string) for `chat`.
"""

from __future__ import annotations

import json
import random
from textwrap import dedent
from typing import Any

from deployments.tools.tasks import Task

# Keys a schema or an instruction may name ("answer" the default when none is named).
KEYS = ("answer", "answer", "answer", "result", "value", "sum", "product", "total")
MODEL_NAMES = ("Answer", "Answer", "Result", "Response", "MathAnswer", "Output", "Solution")
INSTRUCTOR_MD_JSON_USER = "Return the correct JSON response within a ```json codeblock. not the JSON_SCHEMA"


def value(task: Task) -> Any:  # noqa: ANN401 - int, list or str
    if task.kind == "sort":
        return [int(x) for x in task.answer.split(", ")]
    if task.kind == "chat":
        return task.answer
    return int(task.answer)


def json_type(v: Any) -> dict[str, Any]:  # noqa: ANN401
    if isinstance(v, list):
        return {"items": {"type": "integer"}, "type": "array"}
    return {"type": "string"} if isinstance(v, str) else {"type": "integer"}


def schema(key: str, v: Any, title: str = "Answer") -> dict[str, Any]:  # noqa: ANN401
    """A pydantic model's JSON schema (`class Answer(BaseModel): answer: int`), key order included."""
    return {"properties": {key: {"title": key.replace("_", " ").title(), **json_type(v)}}, "required": [key],
            "title": title, "type": "object"}


def text(key: str, v: Any) -> str:  # noqa: ANN401
    """The object as the grammar lets it be written (xgrammar without free whitespace: ", " and ": ")."""
    return json.dumps({key: v})


def instructor_system(schema_: dict[str, Any]) -> str:
    """instructor's system message in its JSON and MD_JSON modes (instructor 1.17,
    v2/providers/openai/handlers.py), byte for byte."""
    return dedent(
        f"""
            As a genius expert, your task is to understand the content and provide
            the parsed objects in json that match the following json_schema:\n

            {json.dumps(schema_, indent=2, ensure_ascii=False)}

            Make sure to return an instance of the JSON, not the schema itself
            """
    )


def schema_tool(schema_: dict[str, Any]) -> dict[str, Any]:
    """instructor's TOOLS mode (its default): the response model as the one tool, named by
    `tool_choice`."""
    name = schema_["title"]
    params = {k: v for k, v in schema_.items() if k != "title"}
    return {"type": "function", "function": {
        "name": name, "description": f"Correctly extracted `{name}` with all the required parameters with correct types",
        "parameters": params}}


INSTRUCTIONS = ("Answer in JSON.", "Reply in JSON.", "Respond with a JSON object.", "Give the answer as JSON.",
                "Return JSON.", "Output JSON only.", "answer in json")
KEYED_INSTRUCTIONS = ('Answer in JSON with the key "{k}".', 'Reply with JSON like {{"{k}": ...}}.',
                      'Respond with a JSON object with one field, "{k}".', 'Return JSON: {{"{k}": <your answer>}}.')
SYSTEMS = ("You are a helpful assistant designed to output JSON.", "Always answer in JSON.",
           "You respond only with valid JSON.")


def prompted(rng: random.Random, task: Task) -> tuple[list[dict], str, str, bool]:
    """A request that asks for JSON in its messages: (messages, key, target text, whether a
    grammar applies too (instructor JSON mode and OpenAI's JSON-mode prompts send response_format
    json_object; an instruction alone may or may not))."""
    v = value(task)
    style = rng.random()
    if style < 0.35:  # instructor JSON (response_format json_object) or MD_JSON (a code block, no grammar)
        key = rng.choice(KEYS)
        system = instructor_system(schema(key, v, rng.choice(MODEL_NAMES)))
        if rng.random() < 0.75:
            return [{"role": "system", "content": system}, {"role": "user", "content": task.question}], key, text(key, v), True
        user = f"{task.question}\n\n{INSTRUCTOR_MD_JSON_USER}"
        return ([{"role": "system", "content": system}, {"role": "user", "content": user}], key,
                f"```json\n{text(key, v)}\n```", False)
    if style < 0.55:
        return ([{"role": "system", "content": rng.choice(SYSTEMS)}, {"role": "user", "content": task.question}],
                "answer", text("answer", v), True)
    if rng.random() < 0.5:
        key, line = "answer", rng.choice(INSTRUCTIONS)
    else:
        key = rng.choice(KEYS)
        line = rng.choice(KEYED_INSTRUCTIONS).format(k=key)
    user = rng.choice([f"{task.question} {line}", f"{line}\n{task.question}", f"{task.question}\n{line}"])
    return [{"role": "user", "content": user}], key, text(key, v), rng.random() < 0.5


def parse(content: str, task: Task, key: str | None) -> dict[str, bool]:
    """What the JSON case scores: the content parses as JSON, conforms (an object; with `key`, one
    holding just that key with a value of the answer's JSON type; without, any object with one
    entry), and is right (that value is the answer)."""
    try:
        data = json.loads(content)
    except ValueError:
        return {"parsed": False, "conforms": False, "correct": False}
    want = value(task)
    if key is None:
        ok = isinstance(data, dict) and len(data) == 1
        got = next(iter(data.values())) if ok else None
    else:
        ok = isinstance(data, dict) and set(data) == {key} and _same_type(data[key], want)
        got = data.get(key) if ok else None
    return {"parsed": True, "conforms": ok, "correct": ok and got == want and type(got) is type(want)}


def _same_type(got: Any, want: Any) -> bool:  # noqa: ANN401
    if isinstance(want, bool) or isinstance(got, bool):
        return False
    return type(got) is type(want)
