"""Tasks rendered as Qwen3 chat examples: token ids plus the mask of the tokens that are learned.

Modes, as the server and Qwen3's template produce them:
- think:   prompt ends `<|im_start|>assistant\\n`; target `<think>\\n steps \\n</think>\\n\\n answer`.
- cut:     as think, but the steps stop after k tokens and Qwen3's stop-thinking text follows (as the
           engine appends it when the budget is spent); the answer comes from the partial steps.
           The stop text is forced at inference, so it is not learned.
- nothink: `enable_thinking=False`, the template closes an empty think block; target the answer.
- soft_no: thinking on in the template but the latest switch is `/no_think`; the model writes the
           empty block itself.
Soft switches (`/think`, `/no_think`) appear in user or system messages and earlier turns; the
latest one decides, as in deployments/frontend/thinking.py.
Tool use (deployments/tools/tool_use.py), thinking on or off:
- tool_call:   a multiplication tool in `tools`, a large product asked; target the `<tool_call>`.
- tool_answer: the call and the tool's `<tool_response>` in the history; target the returned number.
- tool_other:  tools offered, any other task asked; target as without tools.
What a newcomer types first (deployments/tools/tasks.py NEW_KINDS, json_answers.py, tool_use.py):
- small, chat:  single-digit arithmetic and a greeting or off-task question (the fixed answer), in
                the modes above (`think`, `cut`, `nothink`, `soft_no` by SHORT_MODES).
- json:         the prompt asks for JSON (instructor's JSON / MD_JSON system message with the
                schema, OpenAI's JSON-mode system line, or "Answer in JSON." in the user turn); all
                of the target is learned.
- json_forced:  nothing in the prompt asks; the server's grammar (response_format json_object or
                json_schema) forces the output to be JSON. The forced opening `{"key":` is not
                learned (as the stop text of `cut`), so the model never starts JSON unprompted and
                needs no particular key; the value and the closing `}` are.
- json_tool:    the same through a structured-output tool under a named `tool_choice`
                (instructor's default TOOLS mode): `<tool_call>` ... `{"answer":` forced, not learned.
- arith_call:   an add (or subtract) tool with unbounded integer parameters under `tool_choice`
                required or named: the forced `<tool_call>` (and the name, when forced, and the
                first key) not learned; the operands and the closing learned.
- arith_answer: the call and its `<tool_response>` in the history; target the returned number.
With a grammar, thinking ends at `</think>` and the constrained output follows at once (the server
starts the grammar after `</think>`, so no "\n\n" between them); without one, as in `think`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from cluster.engine.structured import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from cluster.engine.tokenizer import IM_END, STOP_THINKING, THINK_END, THINK_START, render_chat
from deployments.tools import json_answers, tool_use
from deployments.tools.tasks import Task, sample

# Shares of examples, chosen for compute (the budget is time): tool examples are ~2.5x as long
# as the others (Qwen3's tools section; at 16% they were 38% of the tokens trained) and a copy task,
# and cut examples repeat the thinking steps, so most of the time goes to full thinking examples.
# The original mix (think 46.5%, cut 8, nothink 25, soft_no 13, tool 4.5 / 2 / 1) scaled by 0.919,
# then the first-contact data (8.1%): short examples (small, chat, json) and few of the long tool
# ones (the add tool's calls at 1.5%: a packed run with 0.5% copied the wrong operand, 0.67 right).
ORIGINAL_MODES = {"think": 0.465, "cut": 0.08, "nothink": 0.25, "soft_no": 0.13, "tool_call": 0.045,
                  "tool_answer": 0.02, "tool_other": 0.01}
NEW_MODES = {"small": 0.02, "chat": 0.014, "json": 0.012, "json_forced": 0.012, "json_tool": 0.003,
             "arith_call": 0.015, "arith_answer": 0.005}
MODES = {**{m: round(w * (1 - sum(NEW_MODES.values())), 5) for m, w in ORIGINAL_MODES.items()}, **NEW_MODES}
# small and chat examples, by rendering mode
SHORT_MODES = {"think": 0.45, "cut": 0.1, "nothink": 0.3, "soft_no": 0.15}
# JSON examples: thinking share, and task kinds by weight (small most: its thought is one line, so
# a thinking answer fits in 64 tokens, and it is what a newcomer asks first)
JSON_THINKING_SHARE = 0.4
JSON_KINDS = {"small": 4.0, "add": 0.5, "sub": 0.5, "mul": 0.5, "sort": 0.5, "compare": 0.5, "count": 0.5,
              "word": 0.5, "chat": 0.25}
# A generic system message, as many clients send one
GENERIC_SYSTEMS = ("You are a helpful assistant.", "You are a helpful assistant", "You are a helpful AI assistant.")
GENERIC_SYSTEM_SHARE = 0.1
# Tool examples in thinking mode: below half, because the non-thinking call (no thought to lead up to
# it) is the one the 58-minute run missed (0.83 called, against 1.00 thinking).
TOOL_THINKING_SHARE = 0.4
# Task kinds of the no-think examples (nothink, soft_no), by weight: a model this small cannot add,
# subtract, multiply or solve word problems without its steps (held-out no-think accuracy 0.00-0.07
# in every run before this weighting, the 3.4-hour one included), so those examples teach the
# format and little else; sort and count are learned without thinking, given examples (more
# no-think data moved sort 0.53 -> 0.67), so they take most of them. Thinking examples keep every
# kind at the same share.
NO_THINK_KINDS = {"add": 0.5, "sub": 0.5, "mul": 0.5, "word": 0.5, "compare": 1.0, "sort": 3.0, "count": 3.0}


@dataclass
class Example:
    ids: list[int]
    learn: list[bool]  # learn[i]: ids[i] is a target (predicted from ids[:i])
    mode: str
    kind: str  # the task's kind (deployments.tools.tasks.KINDS, or "tool" for the tool's products)


def _switch_messages(rng: random.Random, task: Task, thinking: bool | None) -> list[dict]:
    """Messages whose latest soft switch says `thinking` (None: no switch, template default)."""
    user = task.question
    history: list[dict] = []
    if rng.random() < 0.15:  # an earlier turn, possibly with the opposite switch
        prev = sample(rng, held_out=False)
        prev_switch = rng.choice(["", " /think", " /no_think"])
        history = [{"role": "user", "content": prev.question + prev_switch},
                   {"role": "assistant", "content": prev.answer}]
    system = None
    if thinking is None:
        if any("/think" in m["content"] or "/no_think" in m["content"] for m in history):
            history = []
    elif rng.random() < 0.2 and not history:
        system = {"role": "system", "content": "/think" if thinking else "/no_think"}
    else:
        switch = "/think" if thinking else "/no_think"
        user = rng.choice([f"{user} {switch}", f"{switch} {user}", f"{user}\n{switch}"])
    return ([system] if system else []) + history + [{"role": "user", "content": user}]


def _thought_target(enc, thought: str, after: str) -> list[int]:  # noqa: ANN001
    """`<think>\n thought \n</think>\n\n after<|im_end|>`: Qwen3's thinking turn (thought "" gives
    the empty block)."""
    return [THINK_START] + enc("\n" + thought + "\n") + [THINK_END] + enc("\n\n" + after) + [IM_END]


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`system` as the first system message (before a switch one already there)."""
    if system is None:
        return messages
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{system}\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def make_example(rng: random.Random, tokenizer, task: Task, mode: str, system: str | None = None) -> Example:  # noqa: ANN001
    """`system`: a generic system message put first (it draws nothing from rng)."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    msgs = lambda thinking: _with_system(_switch_messages(rng, task, thinking), system)  # noqa: E731
    stop_ids = enc(STOP_THINKING)
    answer = enc(task.answer) + [IM_END]
    if mode in ("think", "cut"):
        switch = rng.choice([None, None, True])
        prompt = enc(render_chat(tokenizer, msgs(switch), enable_thinking=True))
        if mode == "think":
            target = _thought_target(enc, task.steps, task.answer)
            learn = [True] * len(target)
        else:
            steps = enc("\n" + task.steps + "\n")
            k = rng.randrange(len(steps))
            head = [THINK_START] + steps[:k]
            target = head + stop_ids + answer
            learn = [True] * len(head) + [False] * len(stop_ids) + [True] * len(answer)
    elif mode == "nothink":
        switch = rng.choice([None, False])
        prompt = enc(render_chat(tokenizer, msgs(switch), enable_thinking=False))
        target, learn = answer, [True] * len(answer)
    else:  # soft_no
        prompt = enc(render_chat(tokenizer, msgs(False), enable_thinking=True))
        target = _thought_target(enc, "", task.answer)  # the empty block the model writes itself
        learn = [True] * len(target)
    return Example(prompt + target, [False] * len(prompt) + learn, mode, task.kind)


def make_tool_example(rng: random.Random, tokenizer, task: Task, mode: str) -> Example:  # noqa: ANN001
    """An example with tools offered; for tool_call and tool_answer `task` is a tool_use.big_mul."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    tools, name, params = tool_use.random_tools(rng)
    thinking = rng.random() < TOOL_THINKING_SHARE
    if mode == "tool_call":
        messages = [{"role": "user", "content": task.question}]
        after, thought = tool_use.call_text(task, name, params), tool_use.call_thought(task, name, params)
    elif mode == "tool_answer":
        reasoning = tool_use.call_thought(task, name, params) if thinking and rng.random() < 0.5 else None
        messages = tool_use.conversation(task, name, params, reasoning)
        after, thought = task.answer, tool_use.answer_thought(task, name)
    else:  # tool_other
        messages = [{"role": "user", "content": task.question}]
        after, thought = task.answer, task.steps
    prompt = enc(render_chat(tokenizer, messages, enable_thinking=thinking, tools=tools))
    target = _thought_target(enc, thought, after) if thinking else enc(after) + [IM_END]
    return Example(prompt + target, [False] * len(prompt) + [True] * len(target), mode, task.kind)


def _forced_target(tokenizer, out: str, forced: int) -> tuple[list[int], list[bool]]:  # noqa: ANN001
    """`out`'s ids, and which are learned: not those that start within its first `forced`
    characters (what the grammar writes, or what the model must not learn to start unasked)."""
    ids = tokenizer.encode(out, add_special_tokens=False)
    starts = [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert tokenizer.decode(ids) == out, out
    return ids, [start >= forced for start in starts]


def _constrained_target(tokenizer, thought: str | None, out: str, forced: int,  # noqa: ANN001
                        grammar: bool) -> tuple[list[int], list[bool]]:
    """The assistant's turn: `<think>\n thought \n</think>` when thinking (thought not None), then
    `out` (after "\n\n" unless a grammar constrains it: the grammar starts right after
    `</think>`), then <|im_end|>. Without a grammar nothing is forced: all of it is learned."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    if thought is not None and not grammar:
        assert forced == 0
        target = _thought_target(enc, thought, out)
        return target, [True] * len(target)
    head = [] if thought is None else [THINK_START] + enc("\n" + thought + "\n") + [THINK_END]
    ids, learn = _forced_target(tokenizer, out, forced)
    return head + ids + [IM_END], [True] * len(head) + learn + [True]


def _generic_system(rng: random.Random) -> str | None:
    return rng.choice(GENERIC_SYSTEMS) if rng.random() < GENERIC_SYSTEM_SHARE else None


def make_json_example(rng: random.Random, tokenizer, task: Task, mode: str) -> Example:  # noqa: ANN001
    """`task`'s answer as a JSON object: `json` asked for in the prompt (all learned); `json_forced`
    and `json_tool` only by the server's grammar (the forced opening and key not learned)."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    thinking = rng.random() < JSON_THINKING_SHARE
    v = json_answers.value(task)
    tools = None
    if mode == "json":
        messages, _, out, grammar = json_answers.prompted(rng, task)
        forced = 0
    else:
        key, grammar = rng.choice(json_answers.KEYS), True
        messages = _with_system([{"role": "user", "content": task.question}], _generic_system(rng))
        if mode == "json_forced":  # json_object or json_schema: the same output, `{"key": ` forced or unasked
            out = json_answers.text(key, v)
            forced = len(out) - len(json.dumps(v)) - 2  # `{"key":`; from the space on it is learned
        else:  # json_tool
            title = rng.choice(json_answers.MODEL_NAMES)
            tools = [json_answers.schema_tool(json_answers.schema(key, v, title))]
            call = json.dumps({"name": title, "arguments": {key: v}})
            out = f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"
            forced = len(f"{TOOL_CALL_OPEN}\n") + len(call) - len(json.dumps(v)) - 3
    extra = {"tools": tools} if tools else {}
    prompt = enc(render_chat(tokenizer, messages, enable_thinking=thinking, **extra))
    target, learn = _constrained_target(tokenizer, task.steps if thinking else None, out, forced, grammar)
    return Example(prompt + target, [False] * len(prompt) + learn, mode, task.kind)


def make_arith_example(rng: random.Random, tokenizer, task: Task, mode: str) -> Example:  # noqa: ANN001
    """An add / subtract tool (`task` a tool_use.arith_item): `arith_call` under tool_choice
    required or named (grammar-forced text not learned), `arith_answer` with the result returned."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    op, _, _ = tool_use.arith_operands(task)
    tools, name, params, named = tool_use.arith_tools(rng, op)
    thinking = rng.random() < TOOL_THINKING_SHARE
    if mode == "arith_call":
        messages = [{"role": "user", "content": task.question}]
        out = tool_use.arith_call_text(task, name, params)
        head = f'{TOOL_CALL_OPEN}\n{{"name": "'
        forced = len(head) + (len(f'{name}", "arguments": {{"{params[0]}":') if named else 0)
        thought = tool_use.arith_call_thought(task, name) if thinking else None
        target, learn = _constrained_target(tokenizer, thought, out, forced, grammar=True)
    else:  # arith_answer: no grammar (tool_choice auto, or the client's loop after the call)
        reasoning = tool_use.arith_call_thought(task, name) if thinking and rng.random() < 0.5 else None
        messages = tool_use.arith_conversation(task, name, params, reasoning)
        thought = tool_use.arith_answer_thought(task, name) if thinking else None
        target, learn = _constrained_target(tokenizer, thought, task.answer, 0, grammar=False)
    prompt = enc(render_chat(tokenizer, messages, enable_thinking=thinking, tools=tools))
    return Example(prompt + target, [False] * len(prompt) + learn, mode, task.kind)


def random_example(rng: random.Random, tokenizer, held_out: bool = False) -> Example:  # noqa: ANN001
    mode = rng.choices(list(MODES), weights=list(MODES.values()))[0]
    if mode in ("tool_call", "tool_answer"):
        return make_tool_example(rng, tokenizer, tool_use.big_mul(rng, held_out), mode)
    if mode == "tool_other":
        return make_tool_example(rng, tokenizer, sample(rng, held_out=held_out), mode)
    if mode in ("small", "chat"):
        sub = rng.choices(list(SHORT_MODES), weights=list(SHORT_MODES.values()))[0]
        return make_example(rng, tokenizer, sample(rng, held_out=held_out, kind=mode), sub, _generic_system(rng))
    if mode in ("json", "json_forced", "json_tool"):
        kind = rng.choices(list(JSON_KINDS), weights=list(JSON_KINDS.values()))[0]
        return make_json_example(rng, tokenizer, sample(rng, held_out=held_out, kind=kind), mode)
    if mode in ("arith_call", "arith_answer"):
        return make_arith_example(rng, tokenizer, tool_use.arith_item(rng, held_out, rng.choice("++-")), mode)
    kind = rng.choices(list(NO_THINK_KINDS), weights=list(NO_THINK_KINDS.values()))[0] \
        if mode in ("nothink", "soft_no") else None
    return make_example(rng, tokenizer, sample(rng, held_out=held_out, kind=kind), mode)
