"""Messages between Serve's processes larger than gRPC's default cap: the handles call replicas
over gRPC (deployments/app.py SERVE_PROCESS_ENV), whose messages Serve caps at 4 MiB unless told
otherwise, and a long prompt's top logprobs (lm-eval's echo over a 32K context, asked with top 20)
are more than that in one chunk from the pool to the ingress."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.helpers.models import make_checkpoint
from tests.helpers.serving import ServeApp

MODEL = "long"
PROMPT_TOKENS = 24_000  # x 20 alternatives: ~7 MB pickled between the pool and the ingress


@pytest.fixture(scope="module")
def server(serve_app: ServeApp, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = make_checkpoint(tmp_path_factory.mktemp("long"), vocab_size=151936, hidden_size=32, head_dim=8,
                           num_hidden_layers=2, std=0.05, max_position_embeddings=32768)
    return serve_app(model=Path(path), served_model_name=MODEL, thinking={"enabled": False})


def test_a_long_prompts_top_logprobs_come_back_whole(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=300, max_retries=0)
    prompt = [(i * 7919) % 150_000 + 10 for i in range(PROMPT_TOKENS)]
    c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=20).choices[0]
    assert len(c.logprobs.tokens) == PROMPT_TOKENS and c.logprobs.top_logprobs[0] is None
    top = c.logprobs.top_logprobs[1:]  # 20 alternatives each, fewer where two decode to one string (a dict's key)
    assert all(1 <= len(t) <= 20 for t in top) and sum(map(len, top)) >= 19.5 * len(top)
    assert all(v <= 0 for v in c.logprobs.token_logprobs[1:])
