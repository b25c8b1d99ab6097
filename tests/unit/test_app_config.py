"""AppConfig: one schema for the CLI, `serve run` and the chart; bad input names the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.config import AppConfig


def test_defaults_are_two_pools() -> None:
    cfg = AppConfig()
    assert set(cfg.pools()) == {"thinking", "fast"}
    assert cfg.thinking.max_tokens_limit > cfg.fast.max_tokens_limit
    # the same batch (64: at concurrency 64 the fast pool's 32 queued half the requests; see the
    # config's note), the thinking pool's steps take more tokens, the fast pool's stay short
    assert cfg.thinking.engine.max_num_seqs == cfg.fast.engine.max_num_seqs == 64
    assert cfg.thinking.engine.max_num_batched_tokens > cfg.fast.engine.max_num_batched_tokens
    assert cfg.router.default_thinking is True
    assert cfg.http_port == 8000 and cfg.grpc_port == 9000


def test_yaml_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "app.yaml"
    f.write_text(
        "model: /models/qwen3\nserved_model_name: qwen3\n"
        "fast:\n  max_num_seqs: 4\n  autoscaling: {min_replicas: 0, max_replicas: 3}\n"
        "router: {spill_over: false}\n"
    )
    cfg = AppConfig.from_yaml(f)
    assert cfg.fast.engine.max_num_seqs == 4 and cfg.fast.autoscaling.max_replicas == 3
    assert cfg.router.spill_over is False
    assert AppConfig.model_validate(cfg.model_dump()) == cfg


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"fast": {"max_num_seq": 4}}, "fast.max_num_seq"),
        ({"thinking": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "thinking.autoscaling"),
        ({"fast": {"max_num_seqs": 0}}, "fast.engine.max_num_seqs"),
        ({"fast": {"autoscaling": {"look_back_period_s": 2}}}, "fast.autoscaling.look_back_period_s"),
        ({"http_port": 70000}, "http_port"),
        ({"unknown_key": 1}, "unknown_key"),
        ({"thinking": {"enabled": False}, "fast": {"enabled": False}}, "enabled"),
        ({"fast": {"device": "tpu"}}, "fast.parallel.device"),
        ({"thinking": {"stream_interval": 0}}, "thinking.stream_interval"),
        ({"thinking": {"stream_max_delay_ms": -1}}, "thinking.stream_max_delay_ms"),
        ({"fast": {"stream_interval_min_streams": -1}}, "fast.stream_interval_min_streams"),
    ],
)
def test_bad_values_name_the_key(data: dict, where: str) -> None:
    with pytest.raises(ValidationError) as exc:
        AppConfig.model_validate(data)
    assert where in str(exc.value)


def test_app_builder_takes_config_or_path(tmp_path: Path) -> None:
    from ray.serve import Application

    from deployments.app import app_builder

    f = tmp_path / "app.yaml"
    f.write_text("served_model_name: q\nfast: {enabled: false}\n")
    assert isinstance(app_builder({"config_path": str(f)}), Application)
    assert isinstance(app_builder({"served_model_name": "q", "thinking": {"attention_shards": 1, "expert_groups": 2}}), Application)
    with pytest.raises(ValidationError, match="fast.bogus"):
        app_builder({"fast": {"bogus": 1}})


def test_a_pool_block_sets_fields_over_its_preset() -> None:
    cfg = AppConfig.model_validate({"thinking": {"max_num_seqs": 16}, "fast": {"sampling_defaults": {"top_k": 5}}})
    assert cfg.thinking.engine.max_num_seqs == 16 and cfg.thinking.default_max_tokens == 4096
    assert cfg.thinking.cpu_priority == "low" and cfg.thinking.stream_interval == 16
    assert cfg.thinking.stream_max_delay_ms == 100 and cfg.thinking.stream_interval_min_streams == 32
    # the fast pool holds tokens in twos only under load (half its batch streaming)
    assert (cfg.fast.stream_interval, cfg.fast.stream_max_delay_ms, cfg.fast.stream_interval_min_streams) == (2, 100, 32)
    assert cfg.fast.sampling_defaults.model_dump() == {"temperature": 0.7, "top_p": 0.8, "top_k": 5, "min_p": None}
    assert cfg.fast.max_thinking_budget == 0
    with pytest.raises(ValueError, match="thinking.max_num_sequences"):
        AppConfig.model_validate({"thinking": {"max_num_sequences": 16}})


def test_max_ongoing_requests_follows_the_instance_batch() -> None:
    """Unset, a replica takes what its instance runs at once (its sequences over all attention
    shards), so an autoscaling target up to that can be reached; set, it is taken as given."""
    cfg = AppConfig.model_validate({"thinking": {"max_num_seqs": 256, "attention_shards": 8},
                                    "fast": {"max_num_seqs": 16, "max_ongoing_requests": 40}})
    assert cfg.thinking.ongoing_limit == 2048 and cfg.fast.ongoing_limit == 40
    assert AppConfig().thinking.ongoing_limit == 64


def test_colocated_layout_reserves_one_gpu_bundle_per_rank() -> None:
    """Colocated: A actors, each an attention shard and an expert group on one GPU, with both
    kinds' extra resources; separate: A + E bundles. The replica's own bundle comes first."""
    from deployments.app import _instance_bundles

    pool = AppConfig.model_validate({"thinking": {
        "device": "cuda", "attention_shards": 8, "expert_groups": 8, "layout": "colocated",
        "attention_resources": {"q3serve_attention": 1}, "expert_resources": {"q3serve_expert": 1}}}).thinking
    bundles = _instance_bundles(pool)["placement_group_bundles"]
    assert bundles == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0, "q3serve_attention": 1, "q3serve_expert": 1}] * 8
    separate = AppConfig.model_validate({"thinking": {"device": "cuda", "attention_shards": 2, "expert_groups": 3}}).thinking
    assert _instance_bundles(separate)["placement_group_bundles"] == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 5


@pytest.mark.parametrize(
    ("pool", "where"),
    [
        ({"attention_shards": 2, "expert_groups": 4, "layout": "colocated"}, "expert_groups"),
        ({"layout": "stacked"}, "layout"),
        # two ranks of one NCCL group on one GPU: NCCL refuses it, so the config does
        ({"device": "cuda", "attention_shards": 2, "expert_groups": 2, "actor_resources": {"CPU": 1, "GPU": 0.5}},
         "actor_resources"),
    ],
)
def test_bad_layouts_are_refused_naming_the_field(pool: dict, where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        AppConfig.model_validate({"thinking": pool})


@pytest.mark.parametrize("pool", [
    {"cuda_graphs": True},  # on the CPU
    {"cuda_graphs": True, "device": "cuda", "attention_shards": 2, "expert_groups": 2},  # expert-parallel
    {"max_graph_batch": 0, "device": "cuda"},
])
def test_cuda_graphs_are_refused_where_they_cannot_run_naming_the_field(pool: dict) -> None:
    with pytest.raises(ValidationError, match="cuda_graphs" if "cuda_graphs" in pool else "max_graph_batch"):
        AppConfig.model_validate({"thinking": pool})


def test_cuda_graphs_default_on_for_a_single_gpu_replica_only() -> None:
    from cluster.config import EngineConfig, ParallelConfig

    cfg = AppConfig.model_validate({"thinking": {"device": "cuda", "max_graph_batch": 48}}).thinking
    assert cfg.engine.cuda_graphs is None and cfg.engine.max_graph_batch == 48
    assert EngineConfig().graphs_on(ParallelConfig(device="cuda"))
    assert not EngineConfig().graphs_on(ParallelConfig(device="cpu"))
    assert not EngineConfig().graphs_on(ParallelConfig(device="cuda", attention_shards=2, expert_groups=2))
    assert not EngineConfig(cuda_graphs=False).graphs_on(ParallelConfig(device="cuda"))


def test_colocated_fractional_gpus_are_allowed() -> None:
    """In the colocated layout a GPU holds one rank of an instance, so a fraction (two instances'
    ranks sharing a device) is each communicator's one rank there: allowed."""
    pool = {"device": "cuda", "attention_shards": 2, "expert_groups": 2, "layout": "colocated",
            "actor_resources": {"CPU": 1, "GPU": 0.5}}
    assert AppConfig.model_validate({"thinking": pool}).thinking.parallel.layout == "colocated"


def test_fault_settings_reach_serve_and_the_instance() -> None:
    """The watchdog (step_timeout_s) goes to the engine's instance; the health check and the
    drain period go to each pool's Serve deployment."""
    from deployments.app import build_app

    cfg = AppConfig.model_validate({"thinking": {"step_timeout_s": 7, "health_check_period_s": 3,
                                                 "graceful_shutdown_timeout_s": 12},
                                    "fast": {"graceful_shutdown_timeout_s": 45}})
    assert cfg.thinking.parallel.step_timeout_s == 7
    assert AppConfig().fast.parallel.step_timeout_s == 15.0
    app = build_app(cfg)
    handles = app._bound_deployment.init_args[1]
    options = handles["thinking"]._bound_deployment._deployment_config
    assert (options.health_check_period_s, options.graceful_shutdown_timeout_s) == (3, 12)
    assert handles["fast"]._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 45
    # the ingress outlives the longest pool grace, so it can end streams with the retriable event
    assert app._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 45 + 10
