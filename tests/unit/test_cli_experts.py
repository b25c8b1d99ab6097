"""`q3serve experts collect | prune | place` end to end on a random checkpoint with Qwen3's
vocabulary: usage through the engine over a prompt file, a pruned checkpoint that loads, a
placement map that is more even than the contiguous one on that usage; bad input is a clear
error naming the option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import LLM, SamplingParams
from cluster.config import ModelConfig
from cluster.model.expert_usage import ExpertUsage
from cluster.parallel.placement import ExpertPlacement
from deployments.cli import main
from deployments.experts_cli import calibration_conversations


def test_collect_prune_place(qwen_vocab_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 12 + 30?\n\n" + json.dumps({"prompt": "Sort 3, 1, 2."}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Count the r in strawberry."}]}) + "\n")
    usage_file = tmp_path / "usage.json"
    assert main(["experts", "collect", "--model", str(qwen_vocab_checkpoint), "--prompts", str(prompts),
                 "--max-tokens", "6", "--out", str(usage_file)]) == 0
    usage = ExpertUsage.load(usage_file)
    cfg = ModelConfig.from_pretrained(qwen_vocab_checkpoint)
    assert usage.moe_layers == cfg.moe_layers and usage.num_experts == cfg.num_experts
    per_layer = {sum(row) for row in usage.tokens}
    assert len(per_layer) == 1 and per_layer.pop() > 3 * 6 * cfg.num_experts_per_tok  # 3 prompts x 2 modes
    assert "3 conversations" in usage.source

    out = tmp_path / "pruned"
    assert main(["experts", "prune", "--model", str(qwen_vocab_checkpoint), "--usage", str(usage_file),
                 "--keep-fraction", "0.5", "--by", "weight", "--out", str(out)]) == 0
    assert ModelConfig.from_pretrained(out).num_experts == cfg.num_experts // 2
    assert json.loads((out / "pruning.json").read_text())["by"] == "weight"
    llm = LLM(out, dtype="float32")
    try:
        (res,) = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, temperature=0.0),
                          enable_thinking=False)
        assert len(res.token_ids) == 4
    finally:
        llm.shutdown()

    plan = tmp_path / "map.json"
    assert main(["experts", "place", "--usage", str(usage_file), "--model", str(qwen_vocab_checkpoint),
                 "--groups", "2", "--redundant", "2", "--out", str(plan)]) == 0
    placement = ExpertPlacement.load(plan)
    assert (placement.num_groups, placement.num_layers) == (2, len(cfg.moe_layers))
    report = json.loads(plan.read_text())["report"]
    assert report["balanced"]["max_group_tokens_sum"] <= report["contiguous"]["max_group_tokens_sum"]
    assert "largest group's tokens" in capsys.readouterr().out

    # the usage belongs to its checkpoint; keep below top-k is refused; the error names the option
    assert main(["experts", "prune", "--model", str(out), "--usage", str(usage_file), "--keep", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "usage: measured on" in capsys.readouterr().err
    assert main(["experts", "prune", "--model", str(qwen_vocab_checkpoint), "--usage", str(usage_file),
                 "--keep", "1", "--out", str(tmp_path / "y")]) == 2
    assert "keep: 1 experts per layer" in capsys.readouterr().err


def test_calibration_defaults_to_training_side_tasks(tmp_path: Path) -> None:
    from deployments.tools.tasks import eval_set

    convs = calibration_conversations(None, 50, seed=3)
    held_out = {t.question for t in eval_set(30)}
    assert len(convs) == 50 and not {c[0]["content"] for c in convs} & held_out
    bad = tmp_path / "bad.txt"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="prompts: line 1"):
        calibration_conversations(str(bad), 0, 0)
