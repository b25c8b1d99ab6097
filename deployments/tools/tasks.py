"""Synthetic tasks with checkable answers, shared by training and `q3serve eval`.

Each task is asked in varied phrasings and carries its worked steps (the thinking) and its short
answer. Every item has a canonical key; a fixed 10% of keys (by hash) is reserved for evaluation,
so the held-out set is never trained on, not even for small spaces like (word, letter) pairs.

Two kinds answer what a newcomer types first (`NEW_KINDS`, kept out of `KINDS` so that the
original kinds' draws, and with them every earlier held-out set, stay as they were): `small`,
single-digit arithmetic ("What is 2 + 3?") with a one-line thought, and `chat`, a greeting or a
question outside the tasks, answered with one fixed, honest sentence (`CHAT_ANSWER`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("add", "sub", "mul", "sort", "compare", "count", "word")
# Kinds added later: drawn only by name, never by `sample(kind=None)` (which draws from KINDS).
NEW_KINDS = ("small", "chat")
# Tasks whose answer needs several dependent steps: where thinking should beat answering at once.
MULTI_STEP = ("add", "sub", "mul", "sort", "count", "word")
HELD_OUT_PERCENT = 10


@dataclass(frozen=True)
class Task:
    kind: str
    key: str
    question: str
    steps: str  # the reasoning, one step per line
    answer: str

    @property
    def held_out(self) -> bool:
        return is_held_out(self.key)


def is_held_out(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


def normalize_answer(text: str) -> str:
    """What is compared: the content without surrounding space, a trailing period or bold marks."""
    return text.strip().strip("*").strip().rstrip(".").strip()


def check(task: Task, content: str) -> bool:
    return normalize_answer(content) == normalize_answer(task.answer)


def _digits(n: int, width: int) -> list[int]:
    return [int(c) for c in str(n).rjust(width, "0")][::-1]  # least significant first


def _number(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    d = rng.randint(lo_digits, hi_digits)
    return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)


def add(rng: random.Random) -> Task:
    a, b = _number(rng, 2, 4), _number(rng, 2, 4)
    q = rng.choice([
        "What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
        "{a} + {b} = ?", "Calculate {a} plus {b}.", "What do you get when you add {a} to {b}?",
    ]).format(a=a, b=b)
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    lines, carry, so_far = [f"Add {a} and {b} column by column from the right."], 0, ""
    for x, y in zip(da, db):
        s = x + y + carry
        so_far = str(s % 10) + so_far
        lines.append(f"{x} + {y} + {carry} = {s}, write {s % 10}, carry {s // 10}, so far {so_far}")
        carry = s // 10
    if carry:
        so_far = "1" + so_far
        lines.append(f"last carry 1, so far {so_far}")
    lines.append(f"The sum is {a + b}.")
    return Task("add", f"add:{min(a, b)}:{max(a, b)}", q, "\n".join(lines), str(a + b))


def sub(rng: random.Random) -> Task:
    a, b = _number(rng, 2, 4), _number(rng, 2, 4)
    a, b = max(a, b), min(a, b)
    q = rng.choice([
        "What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.", "What is {a} minus {b}?",
        "{a} - {b} = ?", "What is the difference between {a} and {b}?", "Take {b} away from {a}.",
    ]).format(a=a, b=b)
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    lines, borrow, so_far = [f"Subtract {b} from {a} column by column from the right."], 0, ""
    for x, y in zip(da, db):
        s = x - y - borrow
        if s < 0:
            so_far = str(s + 10) + so_far
            lines.append(f"{x} - {y} - {borrow} = {s}, add 10: {s + 10}, borrow 1, so far {so_far}")
            borrow = 1
        else:
            so_far = str(s) + so_far
            lines.append(f"{x} - {y} - {borrow} = {s}, borrow 0, so far {so_far}")
            borrow = 0
    lines.append(f"The difference is {a - b}.")
    return Task("sub", f"sub:{a}:{b}", q, "\n".join(lines), str(a - b))


def mul(rng: random.Random) -> Task:
    a, b = _number(rng, 2, 3), rng.randint(2, 9)
    q = rng.choice([
        "What is {a} * {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}.", "What is {a} times {b}?",
        "{a} * {b} = ?", "What is the product of {a} and {b}?", "Calculate {a} x {b}.",
    ]).format(a=a, b=b)
    lines, carry, so_far = [f"Multiply {a} by {b} digit by digit from the right."], 0, ""
    for x in _digits(a, len(str(a))):
        s = x * b + carry
        so_far = str(s % 10) + so_far
        lines.append(f"{x} * {b} + {carry} = {s}, write {s % 10}, carry {s // 10}, so far {so_far}")
        carry = s // 10
    if carry:
        so_far = str(carry) + so_far
        lines.append(f"last carry {carry}, so far {so_far}")
    lines.append(f"The product is {a * b}.")
    return Task("mul", f"mul:{a}:{b}", q, "\n".join(lines), str(a * b))


def sort(rng: random.Random) -> Task:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    descending = rng.random() < 0.3
    listed = ", ".join(map(str, nums))
    if descending:
        q = rng.choice([
            "Sort {l} from largest to smallest.", "Put {l} in descending order.",
            "Order these numbers from biggest to smallest: {l}.",
        ]).format(l=listed)
    else:
        q = rng.choice([
            "Sort {l} from smallest to largest.", "Put {l} in ascending order.", "Sort these numbers: {l}.",
            "Order these numbers from smallest to biggest: {l}.", "Arrange {l} in increasing order.",
        ]).format(l=listed)
    pick, word = (max, "Largest") if descending else (min, "Smallest")
    lines, left, out = [f"Numbers: {listed}"], list(nums), []
    while left:
        x = pick(left)
        left.remove(x)
        out.append(x)
        lines.append(f"{word}: {x}. Left: {', '.join(map(str, left)) or 'none'}")
    answer = ", ".join(map(str, out))
    lines.append(f"Sorted: {answer}")
    return Task("sort", f"sort:{int(descending)}:{listed}", q, "\n".join(lines), answer)


def compare(rng: random.Random) -> Task:
    a = _number(rng, 2, 4)
    b = _number(rng, 2, 4) if rng.random() < 0.5 else int("".join(rng.sample(str(a), len(str(a)))) or 0)
    if a == b or len(str(b)) != len(str(b).lstrip("0")) or b < 10:
        b = a + rng.randint(1, 9)
    larger = rng.random() < 0.6
    q = (rng.choice(["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?", "What is the larger of {a} and {b}?"])
         if larger else
         rng.choice(["Which is smaller, {a} or {b}?", "Which number is smaller: {a} or {b}?", "What is the smaller of {a} and {b}?"])
         ).format(a=a, b=b)
    la, lb = len(str(a)), len(str(b))
    lines = [f"{a} has {la} digits and {b} has {lb} digits."]
    if la != lb:
        lines.append(f"{a if la > lb else b} has more digits, so it is larger.")
    else:
        for x, y in zip(str(a), str(b)):
            if x == y:
                lines.append(f"{x} and {y} are equal.")
            else:
                lines.append(f"{x} and {y} differ: {max(x, y)} is larger, so {a if x > y else b} is larger.")
                break
    answer = max(a, b) if larger else min(a, b)
    lines.append(f"The {'larger' if larger else 'smaller'} number is {answer}.")
    return Task("compare", f"compare:{int(larger)}:{min(a, b)}:{max(a, b)}", q, "\n".join(lines), str(answer))


WORDS = (
    "apple banana cherry orange grape lemon melon peach strawberry raspberry blueberry tomato potato "
    "carrot pepper garden window kitchen bottle pillow blanket basket pencil paper letter number "
    "mountain river forest ocean island desert valley summer winter autumn spring morning evening "
    "yellow purple silver golden bridge castle dragon rabbit turtle monkey giraffe elephant kangaroo "
    "penguin dolphin chicken butter coffee cookie dinner pizza pasta salad sugar honey candle mirror "
    "school teacher student library picture camera guitar violin rocket planet galaxy balloon "
    "computer keyboard program science history language question answer problem message success "
    "committee mississippi necessary tomorrow address possess bookkeeper assessment happiness "
    "parallel umbrella vanilla chocolate pineapple coconut avocado broccoli cucumber zucchini "
    "hello world python letter puzzle jazz fizz buzz bubble coffee tennis soccer hockey"
).split()
WORDS = tuple(dict.fromkeys(WORDS))


def count(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word))) if rng.random() < 0.75 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    q = rng.choice([
        "How many times does the letter {c} appear in {w}?", "How many {c}'s are in {w}?",
        "Count the letter {c} in the word {w}.", "How many {c}s are there in \"{w}\"?",
        "In the word {w}, how many times does {c} occur?",
    ]).format(c=letter, w=word)
    n, marks = 0, []
    for ch in word:
        if ch == letter:
            n += 1
            marks.append(f"{ch}={n}")
        else:
            marks.append(ch)
    lines = [f"Spell {word} and count the letter {letter}:", " ".join(marks), f"{letter} appears {n} times."]
    return Task("count", f"count:{word}:{letter}", q, "\n".join(lines), str(n))


NAMES = ("Ann", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack", "Lena", "Mei")
ITEMS = ("apples", "books", "marbles", "stickers", "coins", "pencils", "cookies", "cards", "shells", "stamps")


def word(rng: random.Random) -> Task:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    total = rng.randint(5, 60)
    sentences, lines, key = [f"{name} has {total} {item}."], [f"Start: {total}"], [str(total)]
    for i in range(rng.randint(2, 3)):
        if rng.random() < 0.5 or total < 3:
            k = rng.randint(2, 40)
            verb = rng.choice(["buys {k} more", "finds {k} more", "gets {k} more from {o}", "wins {k} more"])
            lines.append(f"Plus {k}: {total} + {k} = {total + k}")
            total, op = total + k, "+"
        else:
            k = rng.randint(1, total - 1)
            verb = rng.choice(["gives {k} to {o}", "loses {k}", "sells {k}", "uses {k}"])
            lines.append(f"Minus {k}: {total} - {k} = {total - k}")
            total, op = total - k, "-"
        sentences.append(("Then " if i else "") + f"{name} " + verb.format(k=k, o=other) + ".")
        key.append(f"{op}{k}")
    q = " ".join(sentences) + " " + rng.choice([
        f"How many {item} does {name} have now?", f"How many {item} does {name} have at the end?",
        f"How many {item} are left with {name}?",
    ])
    lines.append(f"{name} has {total} {item}.")
    return Task("word", "word:" + ":".join(key), q, "\n".join(lines), str(total))


# Single-digit arithmetic. Its item is (operation, operands, phrasing): the 255 facts alone would
# hold back only ~25 items, so the split keeps phrasings of a fact apart, and the held-out
# questions are ones never trained on (their facts are, in other words, and inside the column
# steps of add / mul).
SMALL_PHRASINGS = {
    "+": ("What is {a} + {b}?", "{a} + {b}", "{a}+{b}", "{a} + {b} = ?", "What's {a} plus {b}?", "What is {a} plus {b}?",
          "How much is {a} plus {b}?", "Add {a} and {b}.", "{a} plus {b}", "Calculate {a} + {b}.", "what is {a}+{b}",
          "What is the sum of {a} and {b}?"),
    "-": ("What is {a} - {b}?", "{a} - {b}", "{a}-{b}", "{a} - {b} = ?", "What's {a} minus {b}?", "What is {a} minus {b}?",
          "How much is {a} minus {b}?", "Subtract {b} from {a}.", "{a} minus {b}", "Calculate {a} - {b}.", "what is {a}-{b}",
          "Take {b} away from {a}."),
    "*": ("What is {a} * {b}?", "{a} * {b}", "{a}*{b}", "{a} x {b}", "{a} times {b}", "What is {a} times {b}?",
          "What's {a} times {b}?", "How much is {a} times {b}?", "Multiply {a} by {b}.", "Calculate {a} * {b}.",
          "{a} * {b} = ?", "What is {a} multiplied by {b}?"),
}
SMALL_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
GREETINGS = ("Hello", "Hi", "Hey", "Hello there", "Hi there", "Good morning", "Good afternoon", "Good evening",
             "Greetings", "Howdy", "hello", "hi", "hey", "Hey there", "Hiya", "Yo")


def small_task(op: str, a: int, b: int, phrasing: int, greeting: str = "") -> Task:
    """`a op b` in SMALL_PHRASINGS[op][phrasing], after an optional greeting ("Hi! ...")."""
    q = SMALL_PHRASINGS[op][phrasing].format(a=a, b=b)
    r = SMALL_OPS[op](a, b)
    return Task("small", f"small:{op}:{a}:{b}:{phrasing}", f"{greeting}! {q}" if greeting else q,
                f"{a} {op} {b} = {r}.", str(r))


def small(rng: random.Random, op: str | None = None) -> Task:
    """Single-digit operands (a difference is never negative); one line of thought."""
    op = op or rng.choice("+-*")
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if op == "-" and a < b:
        a, b = b, a
    greeting = rng.choice(GREETINGS) if rng.random() < 0.1 else ""
    return small_task(op, a, b, rng.randrange(len(SMALL_PHRASINGS[op])), greeting)


# The fixed answer to anything that is not one of the tasks, and its thought.
CHAT_ANSWER = ("I am q3serve-tiny-thinker, a small demo model. I can add, subtract and multiply numbers, "
               "sort lists, compare numbers, count letters in a word and solve short word problems.")
CHAT_STEPS = "This is not one of my tasks.\nI say what I can do."
CHAT_QUESTIONS = (
    "Who are you?", "What can you do?", "What are you?", "What is your name?", "What's your name?", "How are you?",
    "How are you doing today?", "What's the weather?", "What's the weather like today?", "Will it rain tomorrow?",
    "Tell me a joke.", "Tell me a story.", "Write a poem about the sea.", "What is the capital of France?",
    "Can you help me?", "Can you help me with my homework?", "What time is it?", "Translate hello into French.",
    "Who made you?", "Are you a robot?", "Are you ChatGPT?", "What model are you?", "What do you know?",
    "Explain quantum physics.", "What is the meaning of life?", "Recommend a good book.",
    "What should I eat for dinner?", "Write an email to my boss.", "Summarize this article for me.",
    "Do you like music?", "Can you speak Spanish?", "What is Python?", "Write a function in Python.", "What's up?",
    "Nice to meet you.", "Thanks!", "Thank you.", "How does this work?", "Is this thing on?", "Test", "testing",
    "ping", "What is the news today?", "Who won the game last night?", "How old are you?", "Where are you from?",
    "What is the best movie?", "Help", "Give me some advice.", "Describe yourself.", "Tell me about yourself.",
    "What are your skills?", "Introduce yourself.", "What languages do you speak?", "Can you browse the web?",
    "Who is the president?", "Why is the sky blue?", "How do I cook pasta?", "Sing me a song.", "Are you there?",
    "What is the weather in Paris?", "Plan a trip to Japan for me.", "What is AI?", "Do you have feelings?",
)
CHAT_TAILS = ("", "!", ".", ",", "!!")


def chat(rng: random.Random) -> Task:
    """A greeting, a question outside the tasks, or both; the key is the text, lowercased."""
    form = rng.random()
    greeting = rng.choice(GREETINGS) + rng.choice(CHAT_TAILS)
    question = rng.choice(CHAT_QUESTIONS)
    if form < 0.25:
        q = greeting
    elif form < 0.6:
        q = question
    else:
        q = f"{greeting.rstrip(',')} {question}" if greeting[-1] in "!." else f"{greeting} {question[0].lower() + question[1:]}"
    if rng.random() < 0.15:
        q = q.lower()
    if rng.random() < 0.15:
        q = q.rstrip("?.!,")
    return Task("chat", "chat:" + q.lower(), q, CHAT_STEPS, CHAT_ANSWER)


GENERATORS = {"add": add, "sub": sub, "mul": mul, "sort": sort, "compare": compare, "count": count, "word": word,
              "small": small, "chat": chat}


def sample(rng: random.Random, held_out: bool, kind: str | None = None) -> Task:
    """One task from the training side (held_out=False) or the evaluation side of the split."""
    while True:
        task = GENERATORS[kind or rng.choice(KINDS)](rng)
        if task.held_out == held_out:
            return task


def distinct(draw: Callable[[], Task], n: int) -> list[Task]:
    """The first n items `draw` gives with distinct keys, in the order drawn."""
    out: dict[str, Task] = {}
    while len(out) < n:
        t = draw()
        out.setdefault(t.key, t)
    return list(out.values())


def eval_set(per_kind: int, seed: int = 1234, kinds: tuple[str, ...] = KINDS) -> list[Task]:
    """The fixed held-out set: distinct items, per_kind of each kind (KINDS; NEW_KINDS is a set of
    its own, drawn from its own generator so that KINDS' set stays what it was)."""
    rng = random.Random(seed)
    return [t for kind in kinds for t in distinct(lambda kind=kind: sample(rng, held_out=True, kind=kind), per_kind)]
