"""Training data follows Qwen3's chat rules as the server applies them, and a short training run
exports a checkpoint that transformers reads, whose full-vocabulary loss is exactly the compact
loss that was trained (the shared unused row)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cluster.engine.tokenizer import IM_END, STOP_THINKING, THINK_END, THINK_START, load_tokenizer
from deployments.frontend.thinking import decide_thinking, soft_switch
from training.data import _switch_messages, make_example
from deployments.tools.tasks import sample
from training.train import packed, parser, save, train


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return load_tokenizer()


def _learned(ex) -> list[int]:  # noqa: ANN001
    return [t for t, learn in zip(ex.ids, ex.learn) if learn]


def test_modes(tok) -> None:  # noqa: ANN001
    rng = random.Random(0)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    stop = enc(STOP_THINKING)
    for _ in range(40):
        task = sample(rng, held_out=False)
        answer = enc(task.answer) + [IM_END]
        ex = make_example(rng, tok, task, "think")
        learned = _learned(ex)
        assert learned[0] == THINK_START and THINK_END in learned and learned[-len(answer):] == answer
        assert tok.decode(learned[1:learned.index(THINK_END)]).strip() == task.steps
        ex = make_example(rng, tok, task, "cut")
        i = next(i for i in range(len(ex.ids)) if ex.ids[i:i + len(stop)] == stop)
        assert not any(ex.learn[i:i + len(stop)])  # the engine forces the stop text: never learned
        assert ex.ids[i + len(stop):] == answer and all(ex.learn[i + len(stop):])
        ex = make_example(rng, tok, task, "nothink")
        prompt = tok.decode([t for t, learn in zip(ex.ids, ex.learn) if not learn])
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and _learned(ex) == answer
        ex = make_example(rng, tok, task, "soft_no")
        assert tok.decode(_learned(ex)) == f"<think>\n\n</think>\n\n{task.answer}<|im_end|>"
        assert ex.learn.index(True) == len(ex.ids) - len(_learned(ex))  # the prompt is never learned


def test_soft_switches_agree_with_the_router() -> None:
    rng = random.Random(1)
    for _ in range(300):
        task = sample(rng, held_out=False)
        for thinking in (True, False):
            msgs = _switch_messages(rng, task, thinking)
            assert decide_thinking(None, msgs, default=not thinking) is thinking, msgs
        assert soft_switch(_switch_messages(rng, task, None)) is None


def test_short_training_exports_what_transformers_reads(tmp_path: Path, tok) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    shape = ["--layers", "2", "--hidden", "32", "--experts", "4", "--top-k", "2", "--moe-intermediate", "16",
             "--vocab-samples", "400", "--save-every", "0"]
    args = parser().parse_args(["--out", str(tmp_path), "--steps", "30", "--batch", "8", "--warmup", "5", *shape])
    run = train(args)
    assert sum(run.losses[-5:]) / 5 < run.losses[0] - 1.0
    save(args, run, dtype=torch.float32)
    meta = json.loads((tmp_path / "training.json").read_text())
    assert meta["steps_done"] == 30 and len(meta["expert_counts_train"]) == 2
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM" and hf.config.vocab_size == 151936

    rng = random.Random(5)
    from training.data import random_example

    examples = [random_example(rng, tok) for _ in range(3)]
    remap = {t: i for i, t in enumerate(run.used)}
    p = packed(examples, remap, groups=2)  # logits at every packed position, in attention groups
    with torch.no_grad():
        compact, _ = run.model(p, at=torch.arange(len(p.ids)))
    start = 0
    for ex in sorted(examples, key=lambda e: len(e.ids)):  # the packed order
        n = len(ex.ids) - 1
        with torch.no_grad():
            full = hf(torch.tensor([ex.ids[:-1]])).logits[0]
        target = torch.tensor(ex.learn[1:])
        ids = torch.tensor([remap.get(t, len(remap)) for t in ex.ids[1:]])
        mine = F.log_softmax(compact[start:start + n], -1)[target].gather(1, ids[target][:, None])
        theirs = F.log_softmax(full, -1)[target].gather(1, torch.tensor(ex.ids[1:])[target][:, None])
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
        start += n

    # --init trains on from the export: 0 steps later the model exports the same tensors
    again = parser().parse_args([*shape, "--init", str(tmp_path), "--steps", "0", "--out", str(tmp_path / "again")])
    resumed = train(again)
    assert resumed.used == run.used
    mine, theirs = resumed.model.export(torch.float32), run.model.export(torch.float32)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_training_experts_equal_the_engines_grouped_experts() -> None:
    """expert_rows (training's autograd-friendly form) computes what the engine's grouped_swiglu
    computes, with the same gradients: the speed-up changes nothing that is learned."""
    from cluster.model.experts import grouped_swiglu
    from training.model import expert_rows

    gen = torch.Generator().manual_seed(0)
    counts = [5, 0, 9, 1, 0, 7]
    xs = torch.randn(sum(counts), 16, generator=gen, requires_grad=True)
    w_gate, w_up, w_down = (torch.randn(6, a, b, generator=gen, requires_grad=True) for a, b in ((8, 16), (8, 16), (16, 8)))
    ours = expert_rows(xs, counts, w_gate, w_up, w_down)
    ref = grouped_swiglu(xs, counts, torch.cat((w_gate, w_up), dim=1).transpose(1, 2), w_down.transpose(1, 2))
    torch.testing.assert_close(ours, ref)
    upstream = torch.randn(ours.shape, generator=gen)
    grads = torch.autograd.grad((ours * upstream).sum(), (xs, w_gate, w_up, w_down))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (xs, w_gate, w_up, w_down))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_a_time_budget_ends_the_run_and_its_schedule() -> None:
    """--minutes stops training when the time is spent, however many --steps were asked, and the
    learning rate follows the clock down to its floor (a tenth of the peak) at the end."""
    from training.train import lr_at, progress_at

    shape = ["--layers", "1", "--hidden", "16", "--experts", "2", "--top-k", "1", "--moe-intermediate", "8",
             "--vocab-samples", "200", "--save-every", "0", "--batch", "2", "--warmup", "2"]
    args = parser().parse_args([*shape, "--steps", "5000", "--minutes", "0.03"])
    run = train(args)
    assert 0 < len(run.losses) < 5000
    assert progress_at(10, 0.5 * 60 * 0.03, args) == pytest.approx(0.5, abs=0.01)
    assert lr_at(10, progress_at(10, 60 * 0.03, args), 2e-3, 2) == pytest.approx(2e-4)
    no_clock = parser().parse_args([*shape, "--steps", "102"])
    assert progress_at(52, 1e9, no_clock) == pytest.approx(0.5)


def test_no_think_examples_favour_the_kinds_learnable_without_steps(tok) -> None:  # noqa: ANN001
    """No-think examples draw their task kind by NO_THINK_KINDS (sort and count, which the model
    learns to answer at once, most); thinking examples keep every kind at the same share."""
    from training.data import NO_THINK_KINDS, random_example
    from deployments.tools.tasks import KINDS

    assert set(NO_THINK_KINDS) == set(KINDS)
    rng = random.Random(11)
    drawn = [random_example(rng, tok) for _ in range(1500)]
    # (small and chat examples use these modes too, at their own shares: NEW_MODES)
    no_think = [e.kind for e in drawn if e.mode in ("nothink", "soft_no") and e.kind in KINDS]
    think = [e.kind for e in drawn if e.mode in ("think", "cut") and e.kind in KINDS]
    total = sum(NO_THINK_KINDS.values())
    for kind in KINDS:  # binomial standard deviations are under 0.03 at these counts
        assert abs(no_think.count(kind) / len(no_think) - NO_THINK_KINDS[kind] / total) < 0.06, kind
        assert abs(think.count(kind) / len(think) - 1 / len(KINDS)) < 0.06, kind
    assert {e.kind for e in drawn if e.mode in ("tool_call", "tool_answer")} == {"tool"}
