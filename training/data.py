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
latest one decides, as in deployments/chat.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cluster.engine.tokenizer import IM_END, STOP_THINKING, THINK_END, THINK_START, render_chat
from training.tasks import Task, sample

MODES = {"think": 0.42, "cut": 0.18, "nothink": 0.25, "soft_no": 0.15}


@dataclass
class Example:
    ids: list[int]
    learn: list[bool]  # learn[i]: ids[i] is a target (predicted from ids[:i])
    mode: str


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


def make_example(rng: random.Random, tokenizer, task: Task, mode: str) -> Example:  # noqa: ANN001
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    stop_ids = enc(STOP_THINKING)
    answer = enc(task.answer) + [IM_END]
    if mode in ("think", "cut"):
        switch = rng.choice([None, None, True])
        prompt = enc(render_chat(tokenizer, _switch_messages(rng, task, switch), enable_thinking=True))
        steps = enc("\n" + task.steps + "\n")
        if mode == "think":
            target = [THINK_START] + steps + [THINK_END] + enc("\n\n" + task.answer) + [IM_END]
            learn = [True] * len(target)
        else:
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
        target = [THINK_START] + enc("\n\n") + [THINK_END] + enc("\n\n" + task.answer) + [IM_END]
        learn = [True] * len(target)
    return Example(prompt + target, [False] * len(prompt) + learn, mode)


def random_example(rng: random.Random, tokenizer, held_out: bool = False) -> Example:  # noqa: ANN001
    mode = rng.choices(list(MODES), weights=list(MODES.values()))[0]
    return make_example(rng, tokenizer, sample(rng, held_out=held_out), mode)
