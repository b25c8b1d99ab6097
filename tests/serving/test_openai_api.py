"""The official openai client against the running application: thinking and fast pools,
reasoning parsing, thinking budget, routing, errors, the sampling surface (penalties, logit bias,
logprobs, n, echo), structured outputs, /tokenize."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from cluster.engine.tokenizer import STOP_THINKING
from tests.helpers.serving import ServeApp, pool_idle_stats, requests_counted, scrape_metrics

MODEL = "qwen3-test"


@pytest.fixture(scope="module")
def server(serve_app: ServeApp) -> str:
    return serve_app(served_model_name=MODEL, thinking={"max_thinking_budget": 64}, fast={"cpu_threads": 2})


@pytest.fixture()
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)


def test_pools_take_their_cpu_settings(server: str) -> None:
    """The thinking preset's engine thread runs at low priority, the fast pool's at normal, each with its threads."""
    thinking, fast = pool_idle_stats("thinking-pool"), pool_idle_stats("fast-pool")
    assert (thinking["engine_priority"], thinking["cpu_threads"]) == ("low", 1)
    assert (fast["engine_priority"], fast["cpu_threads"]) == ("normal", 2)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_thinking_off_goes_fast_without_reasoning(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0,
        extra_body={"enable_thinking": False},
    )
    assert raw.headers["x-q3serve-pool"] == "fast"
    resp = raw.parse()
    msg = resp.choices[0].message
    assert not getattr(msg, "reasoning_content", None)
    assert resp.usage.completion_tokens == 8 and resp.usage.completion_tokens_details.reasoning_tokens == 0
    assert resp.choices[0].finish_reason == "length"


def test_soft_switches_route(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Hello /no_think"}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=4)
    assert raw.headers["x-q3serve-pool"] == "fast"
    msgs += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "Now think harder /think"}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=4)
    assert raw.headers["x-q3serve-pool"] == "thinking"
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=msgs, max_tokens=4, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert raw.headers["x-q3serve-pool"] == "fast"


def test_thinking_budget_appends_stop_text(client: openai.OpenAI) -> None:
    # A random-weight model does not open <think> by itself, so the raw prompt leaves it open;
    # the chat-level check (reasoning_content then content) waits for the trained model.
    prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=50, temperature=0,
                                     extra_body={"thinking_budget": 4, "ignore_eos": True})
    text = resp.choices[0].text
    assert STOP_THINKING.strip().removesuffix("</think>").strip() in text
    assert resp.usage.completion_tokens == 50


def test_thinking_on_routes_to_thinking_pool(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Why?"}], max_tokens=6, temperature=0,
    )
    assert raw.headers["x-q3serve-pool"] == "thinking"
    resp = raw.parse()
    # This model never opens <think>: nothing is reasoning, all is content.
    assert resp.usage.completion_tokens_details.reasoning_tokens == 0
    assert resp.choices[0].message.content


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Count"}], max_tokens=12, temperature=0,
              extra_body={"enable_thinking": False})
    whole = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    content, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert content == whole.choices[0].message.content
    assert finish == "length" and usage.completion_tokens == 12


def test_completions(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == resp.choices[0].text


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL, "messages": "nope"}, 400, "messages"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}, {"role": "tool"}]}, 400, "messages.1.content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 1100}]}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, "max_tokens"),
        # content parts: text only; an image part is refused naming the content
        ({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages.0.content"),
        # fields not built yet are refused naming them, never silently dropped
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval"}]},
         400, "tools.0.type"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400, "tool_choice"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, 400, "functions"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}, 400, "presence_penalty"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 5}}, 400, "logit_bias"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1}, 400, "prompt_logprobs"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, 400, "frobnicate"),
    ],
)
def test_bad_requests_get_openai_errors(server: str, body: dict, status: int, param: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_assistant_turn_may_omit_content(server: str) -> None:
    """OpenAI allows a null assistant content (a turn that only made tool calls)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "x"}]
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text


def test_malformed_json(server: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "error" in r.json()


@pytest.mark.parametrize("n", [1, 3])
def test_client_cancel_frees_kv_blocks(server: str, n: int) -> None:
    """A client that goes away mid-stream ends its request (every choice of it) in the engine."""
    from ray import serve

    pool = serve.get_deployment_handle("fast-pool", app_name="q3serve")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000, "stream": True,
            "ignore_eos": True, "enable_thinking": False, "n": n}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(5 * n):
            next(lines)
        assert pool.stats.remote().result(timeout_s=30)["running"] == n
    stats = pool_idle_stats("fast-pool")
    assert stats["running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def _grew(before: dict[str, float], after: dict[str, float]) -> bool:
    """Some series rose or appeared. Series by series, not a sum: the replicas of the serving
    modules before this one leave the export when their processes end, which can make a sum fall
    while this module's own series grow."""
    return any(v > before.get(k, 0.0) for k, v in after.items())


def test_prometheus_metrics(client: openai.OpenAI) -> None:
    """Every metric is exported, and the counters grow with this test's own requests (the Ray
    cluster is shared with the other serving modules, whose requests counted before): the
    prefix-cache hits of a repeated prompt, a wrong model name counted under status 404, a body
    that does not validate under 400, and so is a field the chat adapter refuses before the pipeline."""
    import time

    wanted = ["ray_q3serve_requests_total", "ray_q3serve_request_latency_seconds_count",
              "ray_q3serve_time_to_first_token_seconds_count", "ray_q3serve_inter_token_latency_seconds_count",
              "ray_q3serve_prompt_tokens_total", "ray_q3serve_generation_tokens_total", "ray_q3serve_queue_depth",
              "ray_q3serve_kv_cache_usage_ratio", "ray_q3serve_expert_tokens", "ray_q3serve_prompt_cached_tokens_total"]
    growing = {"ray_q3serve_requests_total", "ray_q3serve_generation_tokens_total", "ray_q3serve_expert_tokens",
               "ray_q3serve_prompt_cached_tokens_total"}
    before = scrape_metrics(wanted)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "m"}], max_tokens=5,
                                   extra_body={"enable_thinking": False}, stream=True).close()
    repeated = list(range(1000, 1040))  # 40 tokens: the second time, its first full KV blocks are cached
    cached = [client.completions.create(model=MODEL, prompt=repeated, max_tokens=5).usage for _ in range(2)]
    assert cached[1].prompt_tokens_details.cached_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="metrics", max_tokens=5)
    with pytest.raises(openai.BadRequestError):  # no input: refused by the body's validation, counted too
        client.responses.create(model=MODEL, max_output_tokens=5)  # type: ignore[call-overload]
    with pytest.raises(openai.BadRequestError, match="suffix"):  # refused by the chat adapter's own check
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "m"}], max_tokens=5,
                                       extra_body={"suffix": "x"})

    def not_found(seen: dict[str, dict[str, float]]) -> bool:
        return any('status="404"' in k for k in seen.get("ray_q3serve_requests_total", {})) and \
            all(requests_counted(r, "400", seen) > requests_counted(r, "400", before) for r in ("responses", "chat"))

    deadline = time.monotonic() + 60
    seen: dict[str, dict[str, float]] = {}
    while time.monotonic() < deadline:
        seen = scrape_metrics(wanted)
        if set(wanted) <= set(seen) and all(_grew(before.get(n, {}), seen[n]) for n in growing) and not_found(seen):
            break
        time.sleep(1)
    assert set(wanted) <= set(seen), sorted(set(wanted) - set(seen))
    assert all(_grew(before.get(n, {}), seen[n]) for n in growing), [n for n in growing if not _grew(before.get(n, {}), seen[n])]
    assert not_found(seen), sorted(seen["ray_q3serve_requests_total"])


def test_chat_cli_streams_a_conversation(server: str) -> None:
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "chat", "--url", server, "--no-think", "--max-tokens", "5"],
        input="Hello there\nAnd again\n", capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "error" not in run.stderr and run.stdout.strip()
    assert run.stdout.count("\n") >= 2  # each of the two turns ends its streamed reply with a newline


def test_sampling_fields_pass_through(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "seeded"}], max_tokens=8,
              extra_body={"enable_thinking": False, "ignore_eos": True})
    a = client.chat.completions.create(**kw, temperature=1.0, seed=7)
    b = client.chat.completions.create(**kw, temperature=1.0, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content
    lp = client.chat.completions.create(**kw, temperature=0, logprobs=True)
    assert len(lp.choices[0].logprobs.content) == 8 and all(t.logprob <= 0 for t in lp.choices[0].logprobs.content)
    text = lp.choices[0].message.content
    stop = text[2:4] if len(text) >= 4 else text
    cut = client.chat.completions.create(**kw, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[: text.index(stop)]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**kw, n=17)


def test_content_parts_are_joined_text(client: openai.OpenAI) -> None:
    """Text parts (what many SDKs and `vllm bench serve --backend openai-chat` send) are the
    same prompt as their texts joined by newlines."""
    kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"enable_thinking": False})
    parts = client.chat.completions.create(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is 2+3?"}, {"type": "text", "text": "Answer briefly."}]}], **kw)
    plain = client.chat.completions.create(messages=[{"role": "user", "content": "What is 2+3?\nAnswer briefly."}], **kw)
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


def test_fields_at_their_unused_values_and_output_neutral_fields_pass(client: openai.OpenAI) -> None:
    """What SDKs send by default (zero penalties, tool_choice none, text format) and fields with
    no effect on the output (user, metadata) are accepted."""
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0,
        presence_penalty=0, frequency_penalty=0, tool_choice="none", response_format={"type": "text"}, user="u1",
        extra_body={"enable_thinking": False, "metadata": {}, "ignore_eos": True})
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens == 8


def test_top_logprobs_in_chat_streamed_and_not(client: openai.OpenAI) -> None:
    """top_logprobs: per token, that many alternatives, most likely first; greedy picks the
    first. The stream carries the same entries, chunk by chunk."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=6, temperature=0,
              logprobs=True, top_logprobs=3, extra_body={"enable_thinking": False, "ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == 6
    for tok in content:
        assert len(tok.top_logprobs) == 3 and tok.top_logprobs[0].token == tok.token
        assert tok.top_logprobs[0].logprob == pytest.approx(tok.logprob)
        assert [t.logprob for t in tok.top_logprobs] == sorted((t.logprob for t in tok.top_logprobs), reverse=True)
        assert bytes(tok.bytes).decode() == tok.token
    streamed = [t for ch in client.chat.completions.create(**kw, stream=True)
                if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, [a.token for a in t.top_logprobs]) for t in streamed] == [
        (t.token, [a.token for a in t.top_logprobs]) for t in content]


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    """`logprobs: k` on /v1/completions: tokens that make the text, their logprobs, k
    alternatives each as {token: logprob}, and each token's offset into the text; streamed too."""
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 5
    assert all(len(alts) == 2 and tok in alts for tok, alts in zip(lp.tokens, lp.top_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    chunks = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset


def test_penalties_and_logit_bias_change_the_output(client: openai.OpenAI) -> None:
    """Applied, not just accepted. This random model never repeats a token in 12, so the
    penalties are shown the way that moves it: negative frequency / presence penalties (a reward
    for what was generated) make greedy output one token over and over, a repetition penalty
    below 1 pulls it back to the prompt's tokens; a +100 bias makes one token win every step."""
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, logprobs=0,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].logprobs.tokens
    assert len(set(plain)) == 12
    for field in ("frequency_penalty", "presence_penalty"):
        rewarded = client.completions.create(**kw, **{field: -2.0}).choices[0].logprobs.tokens
        assert rewarded == [plain[0]] * 12, field
    echoed = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "repetition_penalty": 0.1}})
    assert set(echoed.choices[0].logprobs.tokens) & {"Once", " upon", " a", " time"}
    biased = client.completions.create(**kw, logit_bias={"1000": 100}).choices[0].logprobs.tokens
    assert len(set(biased)) == 1 and biased[0] != plain[0]


def test_n_choices_streamed_and_not(client: openai.OpenAI) -> None:
    """n=3 sampled with a seed: three choices (indexed 0..2), not all alike, reproducible, the
    prompt counted once and the completions summed; streamed, each index gets the same text as
    the non-streamed request's choice."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "tell me"}], max_tokens=6, temperature=1.0, seed=11,
              n=3, extra_body={"enable_thinking": False, "ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in a.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    one = client.chat.completions.create(**{**kw, "n": 1})
    assert a.usage.prompt_tokens == one.usage.prompt_tokens and a.usage.completion_tokens == 18
    assert texts[0] == one.choices[0].message.content
    streamed = ["", "", ""]
    for ch in client.chat.completions.create(**kw, stream=True):
        for c in ch.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts
    done = client.completions.create(model=MODEL, prompt="Once", max_tokens=4, temperature=0, n=2)
    assert len(done.choices) == 2 and done.choices[0].text == done.choices[1].text


def test_n_over_the_limit_is_refused(server: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 17}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_tokenize_and_detokenize(server: str, client: openai.OpenAI) -> None:
    """vLLM's extension: a prompt's ids round-trip; chat messages tokenize to exactly the prompt a
    chat request is charged for; bad input names its field."""
    r = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": "Once upon a time"}, timeout=30).json()
    assert r["count"] == len(r["tokens"]) == 4 and r["max_model_len"] >= 1024 - 1 and len(r["token_strs"]) == 4
    back = httpx.post(f"{server}/detokenize", json={"model": MODEL, "tokens": r["tokens"]}, timeout=30).json()
    assert back == {"prompt": "Once upon a time"}
    messages = [{"role": "user", "content": "hello there"}]
    chat = httpx.post(f"{server}/tokenize", json={"messages": messages, "enable_thinking": False}, timeout=30).json()
    used = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                          extra_body={"enable_thinking": False})
    assert chat["count"] == used.usage.prompt_tokens
    for path, body, param in (("/tokenize", {"model": MODEL}, "prompt"),
                              ("/detokenize", {"tokens": [10**9]}, "tokens"),
                              ("/tokenize", {"prompt": "x", "model": "other"}, "model")):
        resp = httpx.post(f"{server}{path}", json=body, timeout=30)
        assert resp.status_code in (400, 404) and resp.json()["error"]["param"] == param, resp.text


def test_echo_with_prompt_logprobs_and_max_tokens_zero(server: str, client: openai.OpenAI) -> None:
    """How lm-evaluation-harness scores log-likelihood: echo + logprobs + max_tokens 0 gives the
    prompt back with a logprob per token (None for the first); with tokens to generate, the
    prompt comes first and the completion after, streamed the same."""
    prompt = "The capital of France is Paris"
    n = httpx.post(f"{server}/tokenize", json={"prompt": prompt}, timeout=30).json()["count"]
    only = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = only.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and only.usage.completion_tokens == 0
    assert "".join(c.logprobs.tokens) == prompt and len(c.logprobs.tokens) == n
    assert c.logprobs.token_logprobs[0] is None and all(v <= 0 for v in c.logprobs.token_logprobs[1:])
    # the likeliest alternative, and the prompt's own token where it is another (OpenAI: up to logprobs+1)
    tops = c.logprobs.top_logprobs[1:]
    assert c.logprobs.top_logprobs[0] is None and all(1 <= len(t) <= 2 for t in tops)
    assert all(t[tok] == pytest.approx(lp, abs=1e-5) for t, tok, lp in zip(tops, c.logprobs.tokens[1:], c.logprobs.token_logprobs[1:]))
    pairs = [(t, tok) for t, tok in zip(tops, c.logprobs.tokens[1:]) if len(t) == 2]
    assert pairs and all(next(v for k, v in t.items() if k != tok) >= t[tok] for t, tok in pairs)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=0,
              extra_body={"ignore_eos": True})
    more = client.completions.create(**kw).choices[0]
    assert more.text.startswith(prompt) and len(more.logprobs.tokens) == n + 3
    assert more.logprobs.token_logprobs[0] is None
    assert more.logprobs.token_logprobs[1:n] == pytest.approx(c.logprobs.token_logprobs[1:], abs=1e-4)
    streamed = [ch.choices[0] for ch in client.completions.create(**kw, stream=True) if ch.choices]
    assert "".join(s.text for s in streamed) == more.text
    assert [t for s in streamed if s.logprobs for t in s.logprobs.tokens] == more.logprobs.tokens
    plain_echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, echo=True, temperature=0)
    assert plain_echo.choices[0].text.startswith(prompt) and plain_echo.choices[0].logprobs is None


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}


def test_structured_outputs_with_the_openai_sdk(client: openai.OpenAI) -> None:
    """The SDK's own structured-output helper (a pydantic model -> a strict json_schema, parsed
    back), json_object, streamed JSON, and vLLM's structured_outputs / guided_* fields: each
    output obeys its constraint, sampled as well as greedy."""
    import jsonschema
    from pydantic import BaseModel

    class Answer(BaseModel):
        ok: bool
        n: int

    msgs = [{"role": "user", "content": "give me json"}]
    off = {"enable_thinking": False}
    parsed = client.beta.chat.completions.parse(model=MODEL, messages=msgs, response_format=Answer, max_tokens=60,
                                                temperature=1.0, seed=3, extra_body=off)
    assert isinstance(parsed.choices[0].message.parsed, Answer)
    kw = dict(model=MODEL, messages=msgs, max_tokens=60, temperature=0, extra_body=off,
              response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    jsonschema.validate(json.loads(whole), SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == whole
    obj = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=30, temperature=0, extra_body=off,
                                         response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason in ("stop", "length")
    assert obj.choices[0].message.content.startswith("{")
    choice = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=1.0, extra_body={
        **off, "structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert choice.choices[0].message.content in ("red", "green", "blue")
    regex = client.completions.create(model=MODEL, prompt="code:", max_tokens=10, temperature=1.0,
                                      extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", regex.choices[0].text)


def test_structured_output_in_thinking_mode(client: openai.OpenAI) -> None:
    """Thinking mode: the answer's first token may open the reasoning (which is then free until
    </think>) or start the answer; either way the content obeys the schema. (This random model
    starts the answer; tests/unit/test_structured_output.py covers free reasoning.)"""
    import jsonschema

    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "think, then json"}], max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
        extra_body={"enable_thinking": True, "thinking_budget": 6})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize(("extra", "param"), [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
])
def test_bad_structured_output_requests_name_the_field(server: str, extra: dict, param: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **extra}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


TOOLS = [
    {"type": "function", "function": {"name": "multiply", "description": "a times b",
                                      "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                                                     "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "the time now",
                                      "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
]


def test_required_and_named_tool_calls_with_the_sdk(client: openai.OpenAI) -> None:
    """tool_choice "required" and a named function are enforced by the grammar: the answer is
    OpenAI tool_calls (ids, arguments a JSON string valid for the function), finish_reason
    tool_calls; streamed, the SDK's deltas (name first, then arguments) assemble the same calls."""
    import jsonschema

    msgs = [{"role": "user", "content": "what is 6 times 7?"}]
    # one call each (parallel_tool_calls false): this random model, free to add blocks, might not stop
    kw = dict(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=200, temperature=0, parallel_tool_calls=False,
              extra_body={"enable_thinking": False})
    r = client.chat.completions.create(**kw, tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    named = client.chat.completions.create(**kw, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for ch in client.chat.completions.create(**kw, tool_choice="required", stream=True):
        if not ch.choices:
            continue
        finish = ch.choices[0].finish_reason or finish
        for d in ch.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            if d.function.name:
                assert not entry["arguments"], "the name comes before the arguments"
                entry["name"] = d.function.name
            entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]


def test_tool_turns_render_back_and_none_hides_the_tools(server: str, client: openai.OpenAI) -> None:
    """An assistant turn with tool_calls and the tool's result render into Qwen3's template (the
    conversation continues); tool_choice none offers no tools (the prompt is the plain one)."""
    history = [{"role": "user", "content": "6 times 7?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 6, "b": 7}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=4,
                                       extra_body={"enable_thinking": False})
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with_tools = httpx.post(f"{server}/tokenize", json={"messages": history[:1], "enable_thinking": False}, timeout=30).json()
    hidden = client.chat.completions.create(model=MODEL, messages=history[:1], tools=TOOLS, tool_choice="none",
                                            max_tokens=1, extra_body={"enable_thinking": False})
    offered = client.chat.completions.create(model=MODEL, messages=history[:1], tools=TOOLS, max_tokens=1,
                                             extra_body={"enable_thinking": False})
    assert hidden.usage.prompt_tokens == with_tools["count"] < offered.usage.prompt_tokens


def test_responses_api_with_the_sdk(client: openai.OpenAI) -> None:
    """/v1/responses through the SDK's client.responses: text in, instructions, output_text and
    usage; the stream's events in order with deltas that add up to the same text."""
    kw = dict(model=MODEL, input="Say something.", instructions="Be brief.", max_output_tokens=8, temperature=0,
              reasoning={"effort": "minimal"}, store=False)
    r = client.responses.create(**kw)
    assert r.object == "response" and r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.usage.output_tokens == 8 and r.usage.input_tokens > 0
    assert [item.type for item in r.output] == ["message"]
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta") < kinds.index("response.output_item.done")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    assert events[-1].response.output_text == r.output_text


def test_responses_function_tools_and_structured_text(client: openai.OpenAI) -> None:
    """A required function call comes out as a function_call item (call_id, name, JSON arguments),
    streamed as added / arguments delta / done; its output goes back as a function_call_output
    item; text.format json_schema constrains the message."""
    import jsonschema

    tools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
              "parameters": t["function"]["parameters"]} for t in TOOLS]
    kw = dict(model=MODEL, input="6 times 7?", tools=tools, tool_choice="required", parallel_tool_calls=False,
              max_output_tokens=200, temperature=0, reasoning={"effort": "minimal"})
    r = client.responses.create(**kw)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].call_id.startswith("call_") and calls[0].name in ("multiply", "get_time")
    json.loads(calls[0].arguments)
    streamed = list(client.responses.create(**kw, stream=True))
    args = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == json.loads(calls[0].arguments)
    follow = client.responses.create(model=MODEL, tools=tools, max_output_tokens=4, reasoning={"effort": "minimal"}, input=[
        {"role": "user", "content": "6 times 7?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name, "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "42"}])
    assert follow.status in ("completed", "incomplete")
    structured = client.responses.create(model=MODEL, input="json please", max_output_tokens=60, temperature=0,
                                         reasoning={"effort": "minimal"},
                                         text={"format": {"type": "json_schema", "name": "a", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(structured.output_text), SCHEMA)


@pytest.mark.parametrize(("extra", "param"), [
    ({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"frobnicate": 1}, "frobnicate"), ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0.type"),
    ({"input": []}, "input"), ({"include": ["message.output_text.logprobs", "file_search_call.results"]}, "include.1"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"truncation": "auto"}, "truncation"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"), ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
    ({"reasoning": {"effort": "max"}}, "reasoning.effort"), ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"), ({"context_management": [{"type": "compaction"}]}, "context_management"),
    ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
])
def test_responses_refusals_name_the_field(server: str, extra: dict, param: str) -> None:
    r = httpx.post(f"{server}/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 2, **extra}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_langchain_and_instructor(server: str) -> None:
    """The frameworks users plug in: langchain-openai's bind_tools (a named tool) and
    with_structured_output, and instructor's tool-mode response_model, against the server."""
    import instructor
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        ok: bool
        n: int = Field(ge=0, le=99)

    class MultiplyArgs(BaseModel):  # bounded: this random model would write integers forever
        a: int = Field(ge=0, le=99)
        b: int = Field(ge=0, le=99)

    @tool(args_schema=MultiplyArgs)
    def multiply(a: int, b: int) -> int:
        """Multiply a by b."""
        return a * b

    llm = ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=200,
                     extra_body={"enable_thinking": False}, max_retries=0)
    msg = llm.bind_tools([multiply], tool_choice="multiply").invoke("What is 6 times 7?")
    assert msg.tool_calls and {c["name"] for c in msg.tool_calls} == {"multiply"}
    assert all(set(c["args"]) == {"a", "b"} for c in msg.tool_calls)
    assert isinstance(llm.with_structured_output(Answer).invoke("Answer in JSON."), Answer)
    client = instructor.from_openai(openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0))
    got = client.chat.completions.create(model=MODEL, response_model=Answer, max_retries=0, max_tokens=200, temperature=0,
                                         messages=[{"role": "user", "content": "Answer."}],
                                         extra_body={"enable_thinking": False})
    assert isinstance(got, Answer)


def _vllm_bench_stream(base: str, path: str, payload: dict) -> tuple[bool, str, int]:
    """What `vllm bench serve` does with one request (vllm/benchmarks/lib/endpoint_request_func.py):
    success when a 200 stream gives at least one chunk with choices; tokens from the usage chunk."""
    first, text, tokens = False, "", 0
    with httpx.stream("POST", f"{base}{path}", json=payload, headers={"Content-Type": "application/json"},
                      timeout=120) as r:
        if r.status_code != 200:
            return False, r.read().decode(), 0
        for line in r.iter_lines():
            line = line.strip()
            if not line or line.startswith(":"):
                continue
            chunk = line.removeprefix("data: ")
            if chunk == "[DONE]":
                continue
            data = json.loads(chunk)
            if choices := data.get("choices"):
                first = True
                text += (choices[0]["delta"].get("content") if "delta" in choices[0] else choices[0].get("text")) or ""
            elif usage := data.get("usage"):
                tokens = usage["completion_tokens"]
    return first, text, tokens


def test_vllm_bench_serve_request_bodies_replayed(server: str) -> None:
    """The exact bodies `vllm bench serve --backend openai-chat` and `--backend openai` send
    (with --ignore-eos, as its random dataset runs do), many at once: no failed request, and the
    usage chunk counts the asked tokens. vllm itself is not installable here (no CPU wheel)."""
    from concurrent.futures import ThreadPoolExecutor

    chat = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there " * 20}]}],
            "max_completion_tokens": 12, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    completion = {"model": MODEL, "prompt": "hello there " * 20, "repetition_penalty": 1.0, "max_tokens": 12,
                  "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    jobs = [("/v1/chat/completions", chat)] * 6 + [("/v1/completions", completion)] * 6
    with ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(lambda job: _vllm_bench_stream(server, *job), jobs))
    for ok, text, tokens in results:
        assert ok, text
        assert tokens == 12


def test_empty_conversations_are_400s_naming_the_field(server: str, client: openai.OpenAI) -> None:
    """What a fuzzer found (schemathesis on /openapi.json): messages the template cannot render
    answered 500; they are a 400 naming the field that carried them, and the server keeps serving."""
    r = httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": []}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = httpx.post(f"{server}/v1/responses", json={"model": MODEL, "input": [{"type": "reasoning", "summary": []}]},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices


def test_responses_take_an_empty_include(client: openai.OpenAI) -> None:
    """The OpenAI Agents SDK's Responses model always sends `include: []`."""
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=4, include=[])
    assert r.status in ("completed", "incomplete") and r.usage.input_tokens > 0


def test_responses_include_the_answers_logprobs(client: openai.OpenAI) -> None:
    """include message.output_text.logprobs (+ top_logprobs): the answer's tokens, their texts adding
    up to output_text, the same whole or streamed, and the same numbers chat gives for those tokens;
    metadata and truncation echoed as sent. (That the thinking part is left out: test_thinking.py.)"""
    kw = dict(model=MODEL, input="Say something.", max_output_tokens=100, temperature=0, top_logprobs=2,
              include=["message.output_text.logprobs"], metadata={"k": "v"}, truncation="disabled")
    r = client.responses.create(**kw)
    (message,) = [item for item in r.output if item.type == "message"]
    lps = message.content[0].logprobs
    # this model thinks nothing and starts with a word: all 100 tokens are answer text
    assert r.status == "incomplete" and len(lps) == r.usage.output_tokens == 100
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].logprob >= lp.logprob - 1e-5 for lp in lps)
    assert r.metadata == {"k": "v"} and r.truncation == "disabled" and r.top_logprobs == 2
    events = list(client.responses.create(**kw, stream=True))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in (e.logprobs or [])]
    done = [e for e in events if e.type == "response.output_text.done"]
    assert [(lp.token, lp.logprob) for lp in streamed] == [(lp.token, lp.logprob) for lp in lps]
    assert [(lp.token, lp.logprob) for lp in done[0].logprobs] == [(lp.token, lp.logprob) for lp in lps]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say something."}],
                                          max_tokens=100, temperature=0, logprobs=True)
    assert [(lp.token, round(lp.logprob, 4)) for lp in lps] == \
        [(c.token, round(c.logprob, 4)) for c in chat.choices[0].logprobs.content]


def test_models_say_the_context_and_the_checkpoint(server: str) -> None:
    """vLLM's /v1/models fields: `max_model_len` (what lm-eval and clients size prompts by), `root`."""
    (m,) = httpx.get(f"{server}/v1/models", timeout=60).json()["data"]
    lengths = httpx.post(f"{server}/tokenize", json={"prompt": "x"}, timeout=60).json()["max_model_len"]
    assert m["id"] == MODEL and m["owned_by"] == "q3serve" and m["max_model_len"] == lengths > 0
    assert m["root"] and m["parent"] is None


def test_cached_prompt_tokens_are_reported(client: openai.OpenAI) -> None:
    """usage.prompt_tokens_details.cached_tokens, as OpenAI and vLLM report prefix-cache hits: the
    same long prompt again is served from the cache (whole KV blocks of its prefix)."""
    words = " ".join(f"w{i}" for i in range(60))
    ask = [{"role": "user", "content": f"Cache check {words}"}]
    first = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=2, temperature=0,
                                           extra_body={"enable_thinking": False})
    second = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=2, temperature=0,
                                            extra_body={"enable_thinking": False})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert second.usage.prompt_tokens == first.usage.prompt_tokens


def test_completions_take_a_batch_of_prompts(server: str, client: openai.OpenAI) -> None:
    """`prompt` as a list of strings or of token-id lists (what lm-eval's local-completions sends):
    each prompt its own choices, numbered prompt x n + choice; echo and logprobs per prompt; the
    usage counts every prompt once; a batch over `limits.max_batch_prompts` is a 400 naming it."""
    texts = ["Add 12 and 30.", "Sort 5 2 9."]
    ids = [httpx.post(f"{server}/tokenize", json={"prompt": t}, timeout=60).json()["tokens"] for t in texts]
    r = client.completions.create(model=MODEL, prompt=texts, n=2, max_tokens=3, temperature=0, echo=True)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    for c in r.choices:
        assert c.text.startswith(texts[c.index // 2]), (c.index, c.text)
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 4 * 3
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    by_index = sorted(scored.choices, key=lambda c: c.index)
    for c, p in zip(by_index, ids):
        assert len(c.logprobs.token_logprobs) == len(p) and c.logprobs.token_logprobs[0] is None
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs[1:])
    one = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert one.choices[0].logprobs.token_logprobs == by_index[1].logprobs.token_logprobs  # as if sent alone
    stream = client.completions.create(model=MODEL, prompt=texts, max_tokens=3, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert {c.index for ch in chunks for c in ch.choices} == {0, 1}
    assert chunks[-1].usage.prompt_tokens == sum(map(len, ids)) and chunks[-1].usage.completion_tokens == 6
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": ["x"] * 65, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "65" in r.json()["error"]["message"], r.text
    for bad in ([], [[]], ["a", ""]):
        r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": bad, "max_tokens": 1}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), r.text
