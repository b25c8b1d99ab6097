"""The house plan of DESIGN.md, checked on the imports: `model` imports neither `engine` nor
`parallel`, the engine reaches `parallel` only lazily (executor selection), `cluster` never
imports `deployments`, and `deployments` uses `cluster` through its public names, its config
types and the default model's location."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def test_model_imports_neither_engine_nor_parallel() -> None:
    """...but for the step plan, the engine/executor contract, which itself imports neither."""
    for f in _files("cluster.model"):
        bad = {m for m in _imports(f, top_level_only=False)
               if m.startswith(("cluster.engine", "cluster.parallel")) and not m.startswith("cluster.engine.plan")}
        assert not bad, (f, bad)
    plan = _imports(ROOT / "cluster/engine/plan.py", top_level_only=False)
    assert not {m for m in plan if m.startswith(("cluster.engine", "cluster.model", "cluster.parallel"))}


def test_engine_reaches_parallel_only_lazily() -> None:
    for f in _files("cluster.engine"):
        assert not {m for m in _imports(f, top_level_only=True) if m.startswith("cluster.parallel")}, f


def test_cluster_never_imports_deployments() -> None:
    for f in _files("cluster"):
        assert not {m for m in _imports(f, top_level_only=False) if m.startswith("deployments")}, f


def test_deployments_use_the_public_names() -> None:
    allowed = ("cluster", "cluster.config", "cluster.default_model")
    for f in _files("deployments"):
        used = {m for m in _imports(f, top_level_only=False) if m.startswith("cluster")}
        assert all(m in allowed or m.rsplit(".", 1)[0] in allowed for m in used), (f, used)


def test_kernels_are_leaves() -> None:
    """`model` -> `kernels`: a kernel module imports nothing of the engine or the model (its
    PyTorch twin lives in `model` and the tests compare the two)."""
    for f in _files("cluster.kernels"):
        bad = {m for m in _imports(f, top_level_only=False)
               if m.startswith("cluster") and not m.startswith("cluster.kernels")}
        assert not bad, (f, bad)


SHIPPED = ("cluster", "deployments", "protos")


def test_nothing_shipped_imports_the_repository_tools() -> None:
    """training/ and benchmarks/ are not in the wheel: an import of either from a shipped module
    would fail on a user's install (`q3serve eval` and `q3serve bench` live in deployments/tools)."""
    for package in SHIPPED:
        for f in _files(package):
            bad = {m for m in _imports(f, top_level_only=False) if m.split(".")[0] in ("training", "benchmarks")}
            assert not bad, (f, bad)


def test_nothing_outside_cluster_imports_the_engine_core() -> None:
    for package in ("deployments", "training", "benchmarks"):
        for f in _files(package):
            bad = {m for m in _imports(f, top_level_only=False) if m.startswith("cluster.engine.core")}
            assert not bad, (f, bad)


def _attributes(path: Path) -> set[str]:
    return {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}


def test_deployments_never_reach_into_the_engine_core() -> None:
    """`deployments` uses an Engine (or LLM) through its own methods and stats(), never `.core`."""
    for f in _files("deployments"):
        assert "core" not in _attributes(f), f


ADAPTERS = ("openai_chat", "openai_completions", "responses", "grpc_api", "admin")


def test_protocol_adapters_do_not_import_each_other() -> None:
    """Each adapter translates in and renders out over the front end; what two of them share
    lives in the front end or in api/http.py and api/openai_models.py, and only openai_app.py
    (the HTTP app) puts the HTTP ones together."""
    for name in ADAPTERS:
        used = _imports(ROOT / f"deployments/api/{name}.py", top_level_only=False)
        bad = {m for m in used if m.startswith("deployments.api.")
               and m.split(".")[2] in (*ADAPTERS, "openai_app") and m.split(".")[2] != name}
        assert not bad, (name, bad)


def test_deployments_import_downward() -> None:
    """api -> frontend -> router / pool: the front end knows no protocol, and the router and the
    pools know neither the front end nor a protocol."""
    for f in _files("deployments.frontend"):
        assert not {m for m in _imports(f, top_level_only=False) if m.startswith("deployments.api")}, f
    for name in ("router", "pool", "config", "metrics"):
        used = _imports(ROOT / f"deployments/{name}.py", top_level_only=False)
        assert not {m for m in used if m.startswith(("deployments.api", "deployments.frontend"))}, (name, used)
