"""Expert pruning (the Kalomaze recipe that took Qwen3-30B-A3B to 16B-A3B): per MoE layer, keep
the experts calibration traffic used most and drop the rest, with no retraining. The router
gate's rows are sliced to the kept experts and the experts renumbered 0..N-1 in their original
order, so the router still picks among them by the same logits; `num_experts` becomes N.

The checkpoint is rewritten file by file (a sharded checkpoint stays sharded, with a new index),
one input file in memory at a time; everything else in the directory (tokenizer, generation
config, chat template) is carried over, and `pruning.json` records what was kept."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cluster.config import ModelConfig
from cluster.model.checkpoint import SCALE_SUFFIX, read_header, read_tensor

INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")
_GATE = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")


def _files(src: Path) -> list[str]:
    if (src / INDEX).is_file():
        return sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values()))
    if (src / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors or {INDEX} in {src}")


def check_keep(cfg: ModelConfig, keep: Mapping[int, Sequence[int]], top_k: int) -> int:
    """The kept count N (the same for every MoE layer); every failure names what is wrong."""
    if set(keep) != set(cfg.moe_layers):
        raise ValueError(f"keep: experts must be chosen for the MoE layers {cfg.moe_layers}, got layers {sorted(keep)}")
    sizes = {len(v) for v in keep.values()}
    if len(sizes) != 1:
        raise ValueError(f"keep: every layer must keep the same number of experts, got {sorted(sizes)}")
    n = sizes.pop()
    if not 1 <= top_k <= n:
        raise ValueError(f"keep: {n} experts per layer is below top-k ({top_k}); a token routes to top-k experts")
    for layer, ids in keep.items():
        if len(set(ids)) != len(ids) or not all(0 <= e < cfg.num_experts for e in ids):
            raise ValueError(f"keep: layer {layer} lists {list(ids)}: ids must be distinct and below {cfg.num_experts}")
    return n


def prune_checkpoint(src: str | Path, dst: str | Path, keep: Mapping[int, Sequence[int]], top_k: int | None = None,
                     record: dict | None = None) -> Path:
    """Writes the checkpoint at `src` into `dst` with, per MoE layer, only the experts in
    `keep[layer]`; `top_k` (default: unchanged) sets num_experts_per_tok. `record` goes into
    pruning.json (how the experts were chosen)."""
    src, dst = Path(src), Path(dst)
    cfg = ModelConfig.from_pretrained(src)
    if cfg.num_experts == 0:
        raise ValueError("model: a dense checkpoint has no experts to prune")
    top_k = cfg.num_experts_per_tok if top_k is None else top_k
    n = check_keep(cfg, keep, top_k)
    if dst.resolve() == src.resolve():
        raise ValueError("out: write the pruned checkpoint to another directory")
    dst.mkdir(parents=True, exist_ok=True)
    # old expert id -> new id, per layer, in the original order
    renumber = {layer: {old: new for new, old in enumerate(sorted(ids))} for layer, ids in keep.items()}
    rows = {layer: torch.tensor(sorted(ids)) for layer, ids in keep.items()}
    weight_map: dict[str, str] = {}
    total = 0
    for fname in tqdm(_files(src), desc="pruning", unit="file"):
        entries = read_header(src / fname)
        out: dict[str, torch.Tensor] = {}
        with open(src / fname, "rb") as f:
            for name, entry in entries.items():
                new_name = name
                m = _EXPERT.match(name)
                if m:
                    layer, expert = int(m.group(1)), int(m.group(2))
                    new_id = renumber.get(layer, {}).get(expert)
                    if new_id is None:
                        continue
                    new_name = f"model.layers.{layer}.mlp.experts.{new_id}.{m.group(3)}"
                t = read_tensor(f, entry)
                g = _GATE.match(name)
                if g and int(g.group(1)) in rows:
                    if name + SCALE_SUFFIX in entries:
                        raise ValueError(f"{name}: an FP8 router gate cannot be sliced by rows; dequantize it first")
                    t = t.index_select(0, rows[int(g.group(1))])
                out[new_name] = t.contiguous()
        if out:
            save_file(out, str(dst / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in out})
            total += sum(t.numel() * t.element_size() for t in out.values())
    if (src / INDEX).is_file():
        (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                            indent=2) + "\n")
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in (INDEX, "config.json", "pruning.json"):
            shutil.copy2(item, dst / item.name)
    raw = json.loads((src / "config.json").read_text())
    for key in ("num_experts", "num_local_experts"):
        if key in raw:
            raw[key] = n
    raw["num_experts_per_tok"] = top_k
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    pruned = {"num_experts_before": cfg.num_experts, "num_experts": n, "num_experts_per_tok": top_k,
              "kept": {str(layer): sorted(ids) for layer, ids in sorted(keep.items())}, **(record or {})}
    (dst / "pruning.json").write_text(json.dumps(pruned, indent=1) + "\n")
    return dst
