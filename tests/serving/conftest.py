"""The serving modules' fixtures: `serve_app`, which deploys this module's application from
overrides of the one default (tests/helpers/serving.py) and deletes it when the module ends; the
shared cluster's shutdown after the package's last test; the always-thinking checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.config import AppConfig
from tests.helpers.models import make_thinker_checkpoint
from tests.helpers.serving import ServeApp, app_config, shutdown_cluster, start_app, stop_app


@pytest.fixture(scope="package", autouse=True)
def shared_cluster() -> Iterator[None]:
    """Shuts the shared cluster down after the last serving test."""
    yield
    shutdown_cluster()


@pytest.fixture(scope="module")
def serve_app(request: pytest.FixtureRequest) -> Iterator[ServeApp]:
    """`serve_app(**overrides)` deploys DEFAULT_APP with the overrides deep-merged in (on the
    Qwen-vocabulary checkpoint unless `model=` says otherwise), or `serve_app(config=cfg)` an
    application unlike it, waits until it is healthy (or until `ready_pools` are) and returns its
    base URL; the module's application is deleted when the module ends."""
    deployed = False

    def deploy(config: AppConfig | None = None, *, ready_pools: tuple[str, ...] | None = None,
               **overrides: Any) -> str:
        nonlocal deployed
        if config is None:
            model = overrides.pop("model", None) or request.getfixturevalue("qwen_vocab_checkpoint")
            config = app_config(model, **overrides)
        deployed = True
        return start_app(config, ready_pools)

    yield deploy
    if deployed:
        stop_app()


@pytest.fixture(scope="session")
def thinker_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen-vocabulary model whose greedy choice is always `<think>` (see make_thinker_checkpoint)."""
    return make_thinker_checkpoint(tmp_path_factory.mktemp("thinker"))
