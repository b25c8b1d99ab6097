"""FP8 checkpoints in Qwen's layout (Qwen3-30B-A3B-FP8, Qwen3-235B-A22B-FP8): e4m3 weights with a
float32 `weight_scale_inv` per block, dequantized on load. The reference for the values is a
float64 loop over the blocks; the reference for the model is transformers on the dequantized twin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster import LLM, SamplingParams
from cluster.config import ConfigError, ModelConfig
from cluster.model.checkpoint import CheckpointError, dequantize_fp8
from tests.helpers.models import dequantize_loop, fp8_pair, hf_greedy, hf_model, make_checkpoint, quantize_blocks

def test_dequantize_matches_a_float64_loop_on_ragged_blocks() -> None:
    torch.manual_seed(0)
    for shape, block in (((300, 200), (128, 128)), ((96, 160), (16, 32)), ((5, 7), (128, 128))):
        q, s = quantize_blocks(torch.randn(shape) * 0.3, block)
        ref = dequantize_loop(q, s, block)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(dequantize_fp8(q, s, block, dtype), ref.to(dtype)), (shape, block, dtype)


@pytest.mark.parametrize("block", [(128, 128), (16, 32)])
def test_fp8_checkpoint_generates_as_its_dequantized_twin(tmp_path: Path, block: tuple[int, int]) -> None:
    """Hidden 160 and expert width 48 leave partial blocks at every edge; layer 0 is dense."""
    fp8, twin = fp8_pair(tmp_path, block, hidden_size=160, moe_intermediate_size=48, intermediate_size=200,
                         mlp_only_layers=[0], num_hidden_layers=3)
    assert ModelConfig.from_pretrained(fp8).fp8_block == block
    prompt = [4, 8, 15, 16, 23, 42]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = []
    for path in (fp8, twin):
        llm = LLM(path, dtype="float32", num_kv_blocks=64)
        outs.append(llm.generate([prompt], greedy)[0].token_ids)
        params = {n: p.detach().clone() for n, p in llm.core.executor.runner.model.named_parameters()}
        outs.append(params)
        llm.shutdown()
    assert outs[0] == outs[2] == hf_greedy(hf_model(twin), prompt, 10)
    assert outs[1].keys() == outs[3].keys() and all(torch.equal(outs[1][n], outs[3][n]) for n in outs[1])


def test_unknown_quant_method_is_refused_naming_it(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "awq", "bits": 4}}))
    with pytest.raises(ConfigError, match="quantization_config.quant_method: 'awq'"):
        LLM(path, dtype="float32")


@pytest.mark.parametrize("quant, field", [
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "quantization_config.fmt"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "activation_scheme"),
    ({"quant_method": "fp8"}, "quantization_config.weight_block_size"),
])
def test_fp8_variants_not_read_are_refused_naming_the_field(quant: dict, field: str) -> None:
    raw = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 4,
           "quantization_config": quant}
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(raw)


def test_fp8_tensors_without_config_or_scales_are_refused(tmp_path: Path) -> None:
    fp8, _ = fp8_pair(tmp_path, (16, 16))
    cfg = json.loads((fp8 / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    with pytest.raises(CheckpointError, match="is FP8 but config.json .* has no quantization_config"):
        LLM(fp8, dtype="float32")
    (fp8 / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
        **cfg["quantization_config"], "weight_block_size": [32, 32]}}))
    with pytest.raises(CheckpointError, match="_scale_inv' has shape .* for blocks of \\[32, 32\\]"):
        LLM(fp8, dtype="float32")
    (fp8 / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(fp8 / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, fp8 / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.self_attn.o_proj.weight_scale_inv'"):
        LLM(fp8, dtype="float32")


@pytest.mark.parametrize("block", [(128, 128), (16, 32)])
def test_experts_kept_in_fp8_generate_as_the_dequantized_twin(tmp_path: Path, block: tuple[int, int]) -> None:
    """fp8_weights="keep": every routed expert stays e4m3 with its scales (gate, up and down
    apart, so ragged blocks keep theirs), and the model generates what the dequantized twin does.
    On the CPU each expert matmul goes through the exactly dequantized weight (the path a GPU
    without block-scaled FP8 matmuls takes too)."""
    from cluster.model.fp8 import Fp8Experts

    fp8, twin = fp8_pair(tmp_path, block, hidden_size=160, moe_intermediate_size=48, intermediate_size=200,
                         mlp_only_layers=[0], num_hidden_layers=3)
    prompts = [[4, 8, 15, 16, 23, 42], list(range(50, 90))]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    kept = LLM(fp8, dtype="float32", num_kv_blocks=64, fp8_weights="keep")
    try:
        layers = kept.core.executor.runner.model.layers
        experts = [layer.mlp.experts for layer in layers[1:]]
        assert all(isinstance(e, Fp8Experts) for e in experts)
        e = experts[0]
        assert e.gate.q.dtype == torch.float8_e4m3fn and e.gate.q.shape == (8, 48, 160)
        assert e.gate.scale_inv.shape == (8, -(-48 // block[0]), -(-160 // block[1]))
        assert e.down.scale_inv.shape == (8, -(-160 // block[0]), -(-48 // block[1]))
        got = [o.token_ids for o in kept.generate(prompts, greedy)]
    finally:
        kept.shutdown()
    ref = LLM(twin, dtype="float32", num_kv_blocks=64)
    try:
        assert got == [o.token_ids for o in ref.generate(prompts, greedy)]
    finally:
        ref.shutdown()


def test_block_scaled_matmul_reference_is_the_dense_product_within_fp8_error() -> None:
    """Activations quantized per token and 128-wide group (ragged K too), times block-scaled
    weights: within e4m3's precision of the float product; all-zero rows stay zero."""
    from cluster.model.checkpoint import Fp8Tensor
    from cluster.model.fp8 import blockwise_reference, quantize_rows

    torch.manual_seed(0)
    for m, k, n in ((5, 256, 384), (3, 200, 130)):
        x = torch.randn(m, k)
        x[0] = 0
        w = torch.randn(n, k) * 0.05
        q, s = quantize_blocks(w, (128, 128))
        xq, xs = quantize_rows(x)
        assert xq.dtype == torch.float8_e4m3fn and xs.shape == (m, -(-k // 128))
        got = blockwise_reference(xq, xs, Fp8Tensor(q, s), (128, 128), torch.float32)
        want = x @ w.t()
        assert torch.equal(got[0], torch.zeros(n))
        assert ((got - want).norm() / want.norm()).item() < 0.05


def test_fp8_weights_option(tmp_path: Path) -> None:
    """"auto" dequantizes (kept experts are the slow path, also where block-scaled matmuls run);
    "keep" on a checkpoint that is not FP8 is refused naming the option."""
    from cluster.model.fp8 import blockwise_fp8_available, keeps_fp8

    fp8, twin = fp8_pair(tmp_path, (16, 16))
    assert not blockwise_fp8_available("cpu")
    cfg = ModelConfig.from_pretrained(fp8)
    assert keeps_fp8(cfg, "auto") is False and keeps_fp8(cfg, "keep") is True  # on any device
    assert keeps_fp8(cfg, "dequantize") is False
    with pytest.raises(ValueError, match="fp8_weights: 'keep' needs an FP8 checkpoint"):
        LLM(twin, dtype="float32", fp8_weights="keep")
    with pytest.raises(ValueError, match="fp8_weights: 'fast'"):
        LLM(fp8, dtype="float32", fp8_weights="fast")
