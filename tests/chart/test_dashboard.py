"""The Grafana dashboard the chart ships as a ConfigMap for Grafana's sidecar: rendered by the real
Helm engine, validated as a core kind, its JSON the repository's one copy, every panel with a query
on a metric q3serve exports (benchmarks/dashboard_check.py runs the queries against Prometheus)."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python
import pytest

from tests.chart.test_chart import CHART, ROOT, check_documents, render

DASHBOARD = CHART / "dashboards" / "q3serve.json"


def dashboards(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [d for d in render(values) if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-grafana-dashboard")]


def queries(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Each panel's (rows aside) PromQL expressions, by title."""
    return {p["title"]: [t.get("expr", "") for t in p.get("targets", [])]
            for p in dashboard["panels"] if p["type"] != "row"}


def test_configmap_renders_with_the_sidecar_label_and_the_dashboard() -> None:
    docs = render()
    check_documents(docs)  # the ConfigMap validated strictly, as a core kind
    [cm] = dashboards()
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "serving"
    assert json.loads(cm["data"]["q3serve.json"]) == json.loads(DASHBOARD.read_text())


def test_every_panel_queries_an_exported_metric() -> None:
    """Every panel has a query, and every ray_q3serve_* name in one is a metric deployments/metrics.py
    defines (Ray prefixes ray_; histograms add _bucket)."""
    dashboard = json.loads(DASHBOARD.read_text())
    defined = set(re.findall(r'"(q3serve_[a-z_]+)"', (ROOT / "deployments" / "metrics.py").read_text()))
    panels = queries(dashboard)
    assert len(panels) == 11
    for title, exprs in panels.items():
        assert exprs and all(exprs), title
        for name in re.findall(r"ray_(q3serve_[a-z_]+)", " ".join(exprs)):
            assert name.removesuffix("_bucket") in defined, (title, name)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "pool", "layer"} <= names
    heatmap = next(p for p in dashboard["panels"] if p["type"] == "heatmap")
    assert heatmap["repeat"] == "layer"


def test_labels_namespace_and_annotations_are_configurable() -> None:
    values = {"grafanaDashboard": {"namespace": "monitoring", "labels": {"dashboards": "q3"},
                                   "annotations": {"grafana_folder": "LLM"}}}
    [cm] = dashboards(values)
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["dashboards"] == "q3" and "grafana_dashboard" in cm["metadata"]["labels"]
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}


def test_disabled_renders_no_configmap() -> None:
    assert dashboards({"grafanaDashboard": {"enabled": False}}) == []


@pytest.mark.parametrize("values", [{"grafanaDashboard": {"enabled": "yes"}},
                                    {"grafanaDashboard": {"label": {"grafana_dashboard": "1"}}},
                                    {"grafanaDashboard": {"labels": {"grafana_dashboard": 1}}}])
def test_bad_values_are_refused(values: dict) -> None:
    with pytest.raises(helm_python.HelmError) as exc:
        render(values)
    assert "grafanaDashboard" in str(exc.value)
