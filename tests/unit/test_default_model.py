"""The committed default model: its files, its size, the shared unused row, and the same greedy
outputs in transformers as in this engine (tool calls among them)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cluster import LLM, SamplingParams
from cluster.default_model import default_model_path
from cluster.engine.tokenizer import load_tokenizer, render_chat
from deployments.tools.tool_use import multiply_tool

PROMPTS = [
    ("Add 4524 and 13.", True),
    ("Put 60, 24, 61 in ascending order.", True),
    ("Which is larger, 512 or 498?", False),
    ("What is 15 * 8? /no_think", True),
]


def test_files_and_size() -> None:
    path = default_model_path()
    assert path.name == "q3serve-tiny-thinker" and path.parent.name == "models"
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["vocab_size"] == 151936
    assert 16 <= cfg["num_experts"] <= 32 and 2 <= cfg["num_experts_per_tok"] <= 4
    assert (path / "model.safetensors").stat().st_size <= 50_000_000
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]


def test_unused_rows_share_one_vector() -> None:
    with safe_open(default_model_path() / "model.safetensors", "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    rows, counts = torch.unique(embed, dim=0, return_counts=True)
    assert counts.max() > 150_000 and len(rows) < 2_000  # a few hundred task tokens + the shared row


@pytest.mark.timeout(300)
def test_transformers_gives_the_same_greedy_outputs() -> None:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    tok = load_tokenizer()
    prompts = [tok.encode(render_chat(tok, [{"role": "user", "content": q}], enable_thinking=think))
               for q, think in PROMPTS]
    # With the multiplication tool offered (Qwen3's tools section): the tool call, in both modes.
    prompts += [tok.encode(render_chat(tok, [{"role": "user", "content": "What is 4821 * 37?"}], enable_thinking=think,
                                       tools=[multiply_tool()])) for think in (True, False)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = []
    for ids in prompts:
        out = hf.generate(torch.tensor([ids]), max_new_tokens=160, do_sample=False, eos_token_id=[151645, 151643],
                          pad_token_id=151643)
        expected.append(out[0, len(ids):].tolist())
    llm = LLM(path, dtype="float32")
    try:
        got = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=160, temperature=0.0))]
    finally:
        llm.shutdown()
    strip = lambda ids: ids[:-1] if ids and ids[-1] in (151645, 151643) else ids  # noqa: E731
    assert [strip(g) for g in got] == [strip(e) for e in expected]
    assert all(len(e) > 1 for e in expected)
    assert all("<tool_call>" in tok.decode(e) for e in expected[-2:])

    # The unused ids (rows equal to the shared one) never win and carry almost no probability
    # at any generated position: the compact training loss accounted for all of them. (The
    # position after the end token is not one: nothing is generated there, nor trained.)
    embed = hf.get_input_embeddings().weight
    rows, counts = torch.unique(embed, dim=0, return_counts=True)
    shared = rows[counts.argmax()]
    unused = (embed == shared).all(-1)
    assert unused.sum() > 150_000
    for ids, out in zip(prompts, expected):
        with torch.no_grad():
            probs = hf(torch.tensor([ids + out])).logits[0, len(ids) - 1 : -1].softmax(-1)
        assert probs.shape[0] == len(out)
        assert not unused[probs.argmax(-1)].any()
        assert probs[:, unused].sum(-1).max() < 1e-3
