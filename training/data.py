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
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cluster.engine.tokenizer import IM_END, STOP_THINKING, THINK_END, THINK_START, render_chat
from deployments.tools import tool_use
from deployments.tools.tasks import Task, sample

# Shares of examples, chosen for compute (the budget is time): tool examples are ~2.5x as long
# as the others (Qwen3's tools section; at 16% they were 38% of the tokens trained) and a copy task,
# and cut examples repeat the thinking steps, so most of the time goes to full thinking examples.
MODES = {"think": 0.465, "cut": 0.08, "nothink": 0.25, "soft_no": 0.13, "tool_call": 0.045, "tool_answer": 0.02,
         "tool_other": 0.01}
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


def make_example(rng: random.Random, tokenizer, task: Task, mode: str) -> Example:  # noqa: ANN001
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    stop_ids = enc(STOP_THINKING)
    answer = enc(task.answer) + [IM_END]
    if mode in ("think", "cut"):
        switch = rng.choice([None, None, True])
        prompt = enc(render_chat(tokenizer, _switch_messages(rng, task, switch), enable_thinking=True))
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
        prompt = enc(render_chat(tokenizer, _switch_messages(rng, task, switch), enable_thinking=False))
        target, learn = answer, [True] * len(answer)
    else:  # soft_no
        prompt = enc(render_chat(tokenizer, _switch_messages(rng, task, False), enable_thinking=True))
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


def random_example(rng: random.Random, tokenizer, held_out: bool = False) -> Example:  # noqa: ANN001
    mode = rng.choices(list(MODES), weights=list(MODES.values()))[0]
    if mode in ("tool_call", "tool_answer"):
        return make_tool_example(rng, tokenizer, tool_use.big_mul(rng, held_out), mode)
    if mode == "tool_other":
        return make_tool_example(rng, tokenizer, sample(rng, held_out=held_out), mode)
    kind = rng.choices(list(NO_THINK_KINDS), weights=list(NO_THINK_KINDS.values()))[0] \
        if mode in ("nothink", "soft_no") else None
    return make_example(rng, tokenizer, sample(rng, held_out=held_out, kind=kind), mode)
