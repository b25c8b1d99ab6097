"""A pruned default model served as a user serves it: usage collected with `q3serve experts
collect`, 12 of 16 experts per layer kept by routing weight with `q3serve experts prune`, the
result served as `q3serve up --model DIR` serves it (its AppConfig, on the shared test cluster).
Thinking and non-thinking answers equal transformers' greedy decoding of the same pruned
checkpoint (whatever its quality: how much pruning costs this model is
benchmarks/results/pruning.json); a thinking budget cuts the reasoning and an answer follows."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch

from cluster.config import ModelConfig
from cluster.default_model import default_model_path
from cluster.engine.tokenizer import load_tokenizer, render_chat
from deployments.cli import main as cli
from deployments.config import AppConfig
from tests.helpers.serving import ServeApp

QUESTION = "Add 4524 and 13."
BUDGET_NOTE = "Considering the limited time by the user"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("pruned")
    usage = tmp / "usage.json"
    assert cli(["experts", "collect", "--model", str(default_model_path()), "--tasks", "24", "--max-tokens", "48",
                "--out", str(usage)]) == 0
    out = tmp / "q3serve-tiny-thinker-12of16"
    assert cli(["experts", "prune", "--model", str(default_model_path()), "--usage", str(usage), "--keep-fraction",
                "0.75", "--by", "weight", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def client(serve_app: ServeApp, pruned: Path) -> openai.OpenAI:
    # as `q3serve up --model DIR` serves it, not the test default; float32 in both pools, as the
    # transformers reference runs
    base = serve_app(config=AppConfig.model_validate({"model": str(pruned), "thinking": {"dtype": "float32"},
                                                      "fast": {"dtype": "float32"}}))
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120, max_retries=0)


def _reference(model: Path, thinking: bool) -> tuple[str, str]:
    """transformers' greedy (reasoning, answer) on the pruned checkpoint."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer()
    ids = tok.encode(render_chat(tok, [{"role": "user", "content": QUESTION}], enable_thinking=thinking))
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=300, do_sample=False, eos_token_id=[151645, 151643],
                      pad_token_id=151643)
    text = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
    if not thinking:
        return "", text.strip()
    reasoning, _, answer = text.partition("</think>")  # no </think>: all of it is reasoning
    return reasoning.strip().removeprefix("<think>").strip(), answer.strip()


def _ask(client: openai.OpenAI, thinking: bool, **extra: object):  # noqa: ANN202
    return client.chat.completions.create(
        model="qwen3-moe", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=300,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}, **extra},
    ).choices[0].message


def test_the_checkpoint_is_pruned(pruned: Path) -> None:
    cfg = ModelConfig.from_pretrained(pruned)
    assert cfg.num_experts == 12 and cfg.num_experts_per_tok == ModelConfig.from_pretrained(default_model_path()).num_experts_per_tok
    assert json.loads((pruned / "pruning.json").read_text())["by"] == "weight"


@pytest.mark.parametrize("thinking", [True, False])
def test_served_answers_equal_transformers(client: openai.OpenAI, pruned: Path, thinking: bool) -> None:
    reasoning, answer = _reference(pruned, thinking)
    msg = _ask(client, thinking)
    assert (msg.content or "").strip() == answer
    assert (getattr(msg, "reasoning_content", None) or "").strip() == reasoning
    assert bool(reasoning) == thinking and (answer or reasoning)


def test_budget_cuts_the_reasoning_and_an_answer_follows(client: openai.OpenAI) -> None:
    free = (getattr(_ask(client, True), "reasoning_content", None) or "").strip()
    msg = _ask(client, True, thinking_budget=8)
    reasoning = getattr(msg, "reasoning_content", None) or ""
    assert BUDGET_NOTE in reasoning and BUDGET_NOTE not in free
    kept = reasoning.split(BUDGET_NOTE)[0].strip()
    assert kept and free.startswith(kept)  # the first 8 tokens of the free reasoning, then the cut
    assert (msg.content or "").strip()
