"""The Helm chart, rendered and linted by a real Helm engine (helm-python-sdk), every document
validated offline: RayService and ServiceMonitor against their CRDs (as the API server would,
unknown fields rejected), core kinds with kubernetes-validate in strict mode, and the rendered
serveConfigV2 loaded by AppConfig unchanged."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.config import ParallelConfig
from deployments.app import SERVE_CONTROLLER_ENV, SERVE_PROCESS_ENV
from deployments.config import AppConfig, nest
from deployments.api.grpc_api import SERVICER_FUNCTIONS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "q3serve"
SCHEMAS = Path(os.environ.get("Q3SERVE_K8S_SCHEMAS", ROOT.parent / "shared" / "k8s-schemas"))
PRESETS = sorted((CHART / "presets").glob("*.yaml"))
NCCL = {"socketIfname": "eth0", "ibHca": "mlx5", "debug": "WARN", "env": {"NCCL_IB_GID_INDEX": "3"},
        "rdma": {"resourceName": "rdma/rdma_shared_device_a", "count": 1}}
ALL_ON = {"apiKeys": {"keys": ["k1", "k2"]}, "networkPolicy": {"enabled": True}, "serviceMonitor": {"enabled": True},
          "nccl": NCCL}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = helm_python.Chart.load(str(CHART)).render(values or {}, name="q3", namespace="serving", is_install=True)
    docs = []
    for text in out.values():
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def preset(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _strict(schema: Any) -> Any:
    """additionalProperties: false wherever properties are listed (typos fail), defaults not required."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        props = schema.get("properties")
        if props and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
            if "required" in schema:
                schema["required"] = [r for r in schema["required"] if "default" not in props.get(r, {})]
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


def _prune(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _prune(v) for k, v in doc.items() if v is not None}
    if isinstance(doc, list):
        return [_prune(v) for v in doc]
    return doc


def crd_validator(name: str) -> jsonschema.Draft7Validator:
    if not SCHEMAS.is_dir():
        pytest.skip(f"no CRD schemas at {SCHEMAS} (set Q3SERVE_K8S_SCHEMAS to the shared k8s-schemas folder)")
    crd = yaml.safe_load((SCHEMAS / name).read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema))


def check_documents(docs: list[dict[str, Any]]) -> None:
    kinds = [d["kind"] for d in docs]
    assert kinds.count("RayService") == 1
    for doc in docs:
        if doc["kind"] == "RayService":
            errors = sorted(crd_validator("ray.io_rayservices.yaml").iter_errors(_prune(doc)), key=str)
            assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
        elif doc["kind"] == "ServiceMonitor":
            errors = list(crd_validator("monitoring.coreos.com_servicemonitors.yaml").iter_errors(_prune(doc)))
            assert not errors, [e.message for e in errors[:5]]
        else:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)


def assert_lint_clean(values: dict[str, Any]) -> None:
    """Strict lint: no errors and no message of warning severity or worse (helm: 2 = warning)."""
    result = helm_python.lint(str(CHART), values, strict=True)
    assert result["total_charts_linted"] == 1
    assert not result["errors"] and all(m["severity"] < 2 for m in result["messages"]), result


def serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    rs = next(d for d in docs if d["kind"] == "RayService")
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


@pytest.mark.parametrize("values", [{}, ALL_ON], ids=["defaults", "everything-on"])
def test_default_chart_lints_and_validates(values: dict) -> None:
    assert_lint_clean(values)
    docs = render(values)
    check_documents(docs)
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "Service", "PodDisruptionBudget"} <= kinds
    if values is ALL_ON:
        assert {"Secret", "NetworkPolicy", "ServiceMonitor"} <= kinds
    else:
        assert not {"Secret", "NetworkPolicy", "ServiceMonitor"} & kinds


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_lint_and_validate(path: Path) -> None:
    values = preset(path)
    assert_lint_clean(values)
    docs = render(values)
    check_documents(docs)
    cfg = AppConfig.model_validate(serve_config(docs)["applications"][0]["args"])
    assert cfg.thinking.parallel.expert_groups <= values["model"]["numExperts"]


def _subset(have: object, want: object) -> bool:
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and _subset(have[k], v) for k, v in want.items())
    return have == want


@pytest.mark.parametrize("values", [{}, *[preset(p) for p in PRESETS]], ids=["defaults", *[p.stem for p in PRESETS]])
def test_serve_config_loads_in_app_config_unchanged(values: dict) -> None:
    sc = serve_config(render(values))
    app = sc["applications"][0]
    assert app["import_path"] == "deployments.app:app_builder"
    cfg = AppConfig.model_validate(app["args"])
    expected = _merge(yaml.safe_load((CHART / "values.yaml").read_text())["app"], values.get("app", {}))
    expected["model"] = _merge(yaml.safe_load((CHART / "values.yaml").read_text())["model"],
                               values.get("model", {}))["mountPath"]
    for pool in ("thinking", "fast"):  # the chart writes the flat spelling; each key has its place in the config
        if isinstance(expected.get(pool), dict):
            expected[pool] = nest(expected[pool])
    assert _subset(cfg.model_dump(), expected)  # every value the chart wrote; pool presets fill the rest
    assert sc["grpc_options"]["grpc_servicer_functions"] == SERVICER_FUNCTIONS
    assert sc["grpc_options"]["port"] == 9000 and sc["http_options"]["port"] == 8000


def test_ray_cluster_shape() -> None:
    rs = next(d for d in render() if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    assert rs["enableInTreeAutoscaling"] is True and rs["autoscalerOptions"]["version"] == "v2"
    assert rs["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    groups = {g["groupName"]: g for g in rs["workerGroupSpecs"]}
    assert set(groups) == {"attention", "expert"}
    for name, g in groups.items():
        c = g["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        assert g["resources"] == {f"q3serve_{name}": c["resources"]["limits"]["nvidia.com/gpu"]}
        assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in g["template"]["spec"]["volumes"])
    head_ports = {p["name"]: p["containerPort"] for p in rs["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["serve"] == 8000 and head_ports["serve-grpc"] == 9000
    probe = rs["headGroupSpec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert probe == {"path": "/health", "port": "serve"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workerGroups": {"expert": {"minReplicas": 3, "maxReplicas": 2}}}, "workerGroups.expert.maxReplicas"),
        ({"app": {"thinking": {"attention_shards": 0}}}, "app.thinking.attention_shards"),
        ({"app": {"fast": {"expert_groups": 200}}}, "app.fast.expert_groups"),
        ({"model": {"pvc": {"claimName": ""}}}, "model: set model.pvc.claimName or model.hostPath"),
        ({"app": {"thinking": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}}}, "app.thinking.autoscaling"),
        ({"workerGroups": {"attention": {"gpusPerPod": 0}}}, "gpusPerPod"),
        ({"unknownKey": 1}, "unknownKey"),
        ({"app": {"thinking": {"graceful_shutdown_timeout_s": 120}}, "drain": {"terminationGracePeriodSeconds": 100}},
         "drain.terminationGracePeriodSeconds: 100 is too short"),
    ],
)
def test_bad_values_fail_with_a_message(values: dict, message: str) -> None:
    with pytest.raises(helm_python.HelmError) as exc:
        render(values)
    assert message in str(exc.value)


def test_worker_pods_drain_their_ray_node_before_they_go() -> None:
    """Every GPU worker pod drains its Ray node in a preStop hook (Serve migrates its replicas and
    lets their requests finish) with a deadline inside the pod's termination grace period; the
    head pod (Serve's controller, never drained) has no hook; off when drain.enabled is false."""
    def workers_and_head(values: dict) -> tuple[list[dict], dict]:
        rs = next(d for d in render(values) if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
        return [g["template"]["spec"] for g in rs["workerGroupSpecs"]], rs["headGroupSpec"]["template"]["spec"]

    workers, head = workers_and_head({"drain": {"terminationGracePeriodSeconds": 300}})
    for spec in workers:
        assert spec["terminationGracePeriodSeconds"] == 300
        assert spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == [
            "q3serve", "drain-node", "--deadline-s", "290"]
    assert "lifecycle" not in head["containers"][0] and "terminationGracePeriodSeconds" not in head
    workers, _ = workers_and_head({"drain": {"enabled": False}})
    assert all("lifecycle" not in s["containers"][0] and "terminationGracePeriodSeconds" not in s for s in workers)
    # the hook's command is this package's CLI, with these arguments
    from deployments.cli import build_parser

    args = build_parser().parse_args(["drain-node", "--deadline-s", "290"])
    assert (args.deadline_s, args.address, args.node_id) == (290.0, "auto", None)


def test_lint_reports_schema_violations() -> None:
    result = helm_python.lint(str(CHART), {"image": {"pullPolicy": "Sometimes"}}, strict=True)
    assert result["errors"] or any(m["severity"] >= 2 for m in result["messages"])


def test_api_key_secret_generated_or_existing() -> None:
    generated = [d for d in render({"apiKeys": {"generate": True}}) if d["kind"] == "Secret"]
    assert len(generated) == 1 and len(generated[0]["stringData"]["api-keys"]) == 40
    existing = render({"apiKeys": {"existingSecret": "mine", "keys": ["ignored"]}})
    assert not [d for d in existing if d["kind"] == "Secret"]
    rs = next(d for d in existing if d["kind"] == "RayService")
    env = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "Q3SERVE_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "mine", "key": "api-keys", "optional": True}}},
                   *({"name": k, "value": v} for k, v in SERVE_CONTROLLER_ENV.items()),  # the controller's settings
                   *({"name": k, "value": v} for k, v in SERVE_PROCESS_ENV.items())]  # every process's


def test_serve_process_settings_reach_every_pod() -> None:
    """The handles' transport (and its message cap) is read by each Ray process at start: every
    pod's proxy and replicas must agree with the head's, or a worker's handles go the slow way."""
    spec = next(d for d in render({}) if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert len(pods) == 3
    for g in pods:
        env = {e["name"]: e.get("value") for e in g["template"]["spec"]["containers"][0]["env"]}
        assert {k: env.get(k) for k in SERVE_PROCESS_ENV} == SERVE_PROCESS_ENV
    for g in spec["workerGroupSpecs"]:  # the controller's settings stay on the head, where it runs
        env = {e["name"] for e in g["template"]["spec"]["containers"][0]["env"]}
        assert not env & set(SERVE_CONTROLLER_ENV)


def test_nccl_settings_reach_every_gpu_worker_and_only_them() -> None:
    """NCCL variables and the RDMA device resource (with IPC_LOCK, which RDMA needs to pin memory)
    on both GPU worker groups; the head runs no collective and gets none of it."""
    rs = next(d for d in render({"nccl": NCCL}) if d["kind"] == "RayService")
    spec = rs["spec"]["rayClusterConfig"]
    workers = [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    assert len(workers) == 2
    for c in workers:
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert {k: env.get(k) for k in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_DEBUG", "NCCL_IB_GID_INDEX")} == {
            "NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_HCA": "mlx5", "NCCL_DEBUG": "WARN", "NCCL_IB_GID_INDEX": "3"}
        assert c["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
        assert c["resources"]["requests"]["rdma/rdma_shared_device_a"] == "1"
        assert c["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert not any(e["name"].startswith("NCCL_") for e in head["env"]) and "securityContext" not in head
    plain = next(d for d in render({}) if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    for g in plain["workerGroupSpecs"]:
        c = g["template"]["spec"]["containers"][0]
        assert not any(e["name"].startswith("NCCL_") for e in c["env"]) and "securityContext" not in c
    with pytest.raises(Exception, match="NCCL_|nccl"):
        render({"nccl": {"env": {"LD_PRELOAD": "x"}}})


# The real shapes (Qwen's config.json files) and the devices the presets are written for (GiB the
# driver reports: H200 143,771 MiB, H100 81,559 MiB).
QWEN3_235B = dict(layers=94, hidden=4096, heads=64, kv_heads=4, head_dim=128, experts=128, moe_inter=1536, vocab=151936)
QWEN3_30B = dict(layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, moe_inter=768, vocab=151936)
PRESET_TARGETS = {"qwen3-235b-a22b-h200": (QWEN3_235B, 140.4, 8), "qwen3-235b-a22b-fp8-h200": (QWEN3_235B, 140.4, 8),
                  "qwen3-30b-a3b-single-node": (QWEN3_30B, 79.6, 8)}


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_arithmetic_fits_the_devices(path: Path) -> None:
    """Each preset's layout against the model's real shapes in bf16 (the worst case for an FP8
    checkpoint too: a GPU that cannot keep its experts in FP8 dequantizes them): an expert group's slice leaves room on its GPU, an attention
    shard's KV share (on a GPU it shares with an expert group, in the colocated layout) holds at
    least one max_model_len sequence, an instance fits one node, the pools' replicas fit the
    worker pods that advertise what their bundles ask for, and a replica takes as many requests
    as it can batch."""
    s, gib, node_gpus = PRESET_TARGETS[path.stem]
    values = preset(path)
    cfg = AppConfig.model_validate(serve_config(render(values))["applications"][0]["args"])
    h, layers = s["hidden"], s["layers"]
    expert = 3 * h * s["moe_inter"] * 2
    attention = h * (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"] + s["heads"] * s["head_dim"] * h + h * s["experts"]
    rest = (layers * attention + 2 * s["vocab"] * h) * 2
    kv_per_token = 2 * layers * s["kv_heads"] * s["head_dim"] * 2
    device = gib * 2**30
    for name, pool in cfg.pools().items():
        per_group = -(-s["experts"] // pool.parallel.expert_groups) * layers * expert
        assert per_group <= 0.85 * device, f"{name}: {per_group / 2**30:.1f} GiB of experts per GPU"
        weights = rest + (per_group if pool.parallel.layout == "colocated" else 0)  # on an attention shard's GPU
        kv = (pool.engine.gpu_memory_utilization or 0) * device - weights - 8 * 2**30  # 8 GiB: activations, NCCL, context
        assert kv / kv_per_token >= (pool.engine.max_model_len or 40960), f"{name}: {kv / kv_per_token:.0f} KV tokens"
        assert _parallel(pool).num_actors <= node_gpus
        assert pool.ongoing_limit >= pool.autoscaling.target_ongoing_requests
    groups = {k: g for k, g in values["workerGroups"].items() if g.get("enabled", True)}
    rendered = next(d for d in render(values) if d["kind"] == "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert sorted(g["groupName"] for g in rendered) == sorted(groups)
    for bound, pods in (("min_replicas", "minReplicas"), ("max_replicas", "maxReplicas")):
        need: dict[str, float] = {}
        for pool in cfg.pools().values():
            for bundle in _parallel(pool).bundles():
                for key, amount in bundle.items():
                    if key.startswith("q3serve_"):
                        need[key] = need.get(key, 0) + amount * getattr(pool.autoscaling, bound)
        assert need, "the pools' bundles ask for no worker group's resource"
        for key, amount in need.items():
            g = groups[key.removeprefix("q3serve_")]
            assert amount <= g[pods] * g["gpusPerPod"], f"{key} at {bound}: {amount} GPUs needed"


def _parallel(pool: Any) -> ParallelConfig:
    return pool.parallel


def test_colocated_preset_is_one_worker_group_of_whole_nodes() -> None:
    """The 235B preset: one instance per 8-GPU pod, every rank an attention shard and an expert
    group; the default attention / expert groups are switched off, not rendered empty."""
    values = preset(CHART / "presets" / "qwen3-235b-a22b-h200.yaml")
    docs = render(values)
    spec = next(d for d in docs if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    assert [(g["groupName"], g["resources"]) for g in spec["workerGroupSpecs"]] == [("node", {"q3serve_node": "8"})]
    cfg = AppConfig.model_validate(serve_config(docs)["applications"][0]["args"])
    for pool in cfg.pools().values():
        assert pool.parallel.layout == "colocated" and _parallel(pool).num_actors == 8


def test_colocated_layout_needs_as_many_groups_as_shards() -> None:
    with pytest.raises(helm_python.HelmError, match="app.thinking.layout"):
        render({"app": {"thinking": {"layout": "colocated", "attention_shards": 2, "expert_groups": 4}}})
