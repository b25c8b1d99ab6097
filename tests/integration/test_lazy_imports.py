"""Importing a config type does not import torch (DESIGN.md: `cluster/__init__.py` loads its names
lazily): the CLI, the app's config and clients start in a fraction of a second. Each check runs
in a fresh interpreter, since this one has torch loaded already."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _without_torch(code: str) -> None:
    check = f"import sys\n{code}\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("code", [
    "import cluster.config",
    "import cluster",
    "from cluster import EngineConfig, ParallelConfig, SamplingParams, RequestError, ModelConfig",
])
def test_config_types_import_without_torch(code: str) -> None:
    _without_torch(code)


def test_engine_names_still_resolve() -> None:
    """The lazy names are the same objects as their modules' (and unknown ones still fail)."""
    import cluster
    from cluster.engine.engine import Engine

    assert cluster.Engine is Engine
    assert set(cluster.__all__) <= set(dir(cluster))
    with pytest.raises(AttributeError, match="no_such_name"):
        cluster.no_such_name  # noqa: B018


def test_cli_imports_without_torch() -> None:
    """`q3serve chat`, `bench`, `eval` and `--help` need no torch; only `generate` (and `up`,
    through the app) load it, inside their commands."""
    _without_torch("from deployments.cli import main")


def test_chat_and_bench_clients_load_without_torch() -> None:
    """`q3serve chat` (HTTP or gRPC) and `q3serve bench`, its workload's tokenizer included, are
    clients: they start without torch."""
    _without_torch("from deployments.cli import build_parser\nbuild_parser()\n"
                   "import deployments.http_client, deployments.grpc_client\n"
                   "from deployments.tools.bench import run\nassert run._decoder()([9707]) == 'Hello'")
