"""The ingress calls its pools over Serve's gRPC transport (deployments/app.py SERVE_PROCESS_ENV),
not as Ray actor tasks, even though the pools' handles were bound in the driver (whose Serve chose
its transport on import, before the environment was set); and messages between Serve's processes
larger than gRPC's default cap (4 MiB) get through: a long prompt's top logprobs (lm-eval's echo
over a 32K context, asked with top 20) are more than that in one chunk."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
from ray import serve

from tests.helpers.models import make_checkpoint
from tests.helpers.serving import APP, ServeApp, scrape_metrics

MODEL = "long"
PROMPT_TOKENS = 24_000  # x 20 alternatives: ~7 MB pickled between the pool and the ingress


@pytest.fixture(scope="module")
def server(serve_app: ServeApp, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = make_checkpoint(tmp_path_factory.mktemp("long"), vocab_size=151936, hidden_size=32, head_dim=8,
                           num_hidden_layers=2, std=0.05, max_position_embeddings=32768)
    return serve_app(model=Path(path), served_model_name=MODEL, thinking={"enabled": False})


@pytest.fixture()
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=300, max_retries=0)


def _pool_request_tasks() -> float:
    """Actor tasks finished that carried a request to a fast-pool replica (what a by-reference
    handle sends; a gRPC call is no task), as Ray's own task metrics count them."""
    series = scrape_metrics(["ray_tasks"]).get("ray_tasks", {})
    name = 'Name="ServeReplica:q3serve:fast-pool.handle_request_with_rejection"'
    return sum(v for k, v in series.items() if name in k and 'Source="owner"' in k and 'State="FINISHED"' in k)


def _until(count: float, timeout_s: float = 30) -> float:
    """The count of such tasks once it reaches `count` (the metrics export lags), or as it is then."""
    deadline = time.monotonic() + timeout_s
    while (seen := _pool_request_tasks()) < count and time.monotonic() < deadline:
        time.sleep(1)
    return seen


def test_the_ingress_calls_its_pools_over_grpc(client: openai.OpenAI) -> None:
    before = _pool_request_tasks()
    for _ in range(4):
        client.completions.create(model=MODEL, prompt="one two three", max_tokens=4)
    # The control: a handle from this driver (by reference) does show up as an actor task, so the
    # absence below is the transport and not task events that never arrive.
    serve.get_deployment_handle("fast-pool", app_name=APP).stats.remote().result(timeout_s=30)
    assert _until(before + 1) == before + 1
    time.sleep(6)  # past the metrics' export period: the ingress's tasks, were there any, would show by now
    assert _pool_request_tasks() == before + 1


def test_a_long_prompts_top_logprobs_come_back_whole(client: openai.OpenAI) -> None:
    prompt = [(i * 7919) % 150_000 + 10 for i in range(PROMPT_TOKENS)]
    c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=20).choices[0]
    assert len(c.logprobs.tokens) == PROMPT_TOKENS and c.logprobs.top_logprobs[0] is None
    # 20 alternatives each, and the prompt's token where it is another; fewer where two decode to one string
    top = c.logprobs.top_logprobs[1:]
    assert all(1 <= len(t) <= 21 for t in top) and sum(map(len, top)) >= 19.5 * len(top)
    assert all(v <= 0 for v in c.logprobs.token_logprobs[1:])
