"""Routed experts kept in FP8 (Qwen's -FP8 checkpoints: e4m3 weights, a float32 scale per block
of `weight_block_size`), so that an expert group holds half the bytes of bf16.

The experts are 97% of a Qwen3 MoE's weights (227 of 235 B parameters), so they are what is kept
in FP8; attention, router gates, embeddings and the head are dequantized to the serving dtype on
load as before. Each matmul is either

- block-scaled FP8 on the GPU (`torch.nn.functional.scaled_mm`, activations quantized per token
  and 128-wide group, DeepSeek's and Qwen's "dynamic" scheme, weights with their 128x128 scales),
  where a one-time probe on this device shows it matches the reference, or
- the reference: the expert's weights dequantized exactly (`dequantize_fp8`, the very values the
  load-time dequantization gives) and a matmul in the serving dtype. This runs anywhere and gives
  the dequantized model's results; on the CPU it is the correctness path, not a fast one.

On a GPU with Triton, kept experts instead run the grouped FP8 kernel (`Fp8Experts.fused`,
cluster/kernels/gpu/moe.py: all experts of a layer in one pass, weights dequantized in registers),
the same kernel shape as the bf16 experts' one; the per-expert path above stays for the CPU and as
the reference.

`fp8_weights` ("auto" | "keep" | "dequantize", EngineConfig and PoolConfig) decides per process.
"auto" dequantizes: the per-expert path decoded 16 sequences 16x slower than the dequantized
experts' grouped bf16 path on an H200 (benchmarks/results/gpu_check.json), and the grouped FP8
kernel has not yet been timed on a GPU (benchmarks/decode_floor.py's `fp8` rows will say whether
kept FP8 beats bf16; then "auto" keeps FP8 where it does); "keep" is for a model that only fits in
FP8."""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from cluster.config import ModelConfig
from cluster.model.checkpoint import Fp8Tensor, Shape, dequantize_fp8, scale_shape
from cluster.model.experts import sort_by_expert, weighted_sum_back
from cluster.model.layers import silu_mul

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
GROUP = 128  # activation quantization group along K (the scaled matmul's 1x128 recipe)
FP8_WEIGHTS = ("auto", "keep", "dequantize")


def quantize_rows(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: x [M, K] -> e4m3 values and a float32 scale per token and
    `group`-wide slice of K ([M, ceil(K / group)]), each slice's absolute max mapped to 448."""
    m, k = x.shape
    pad = -k % group
    xf = F.pad(x.float(), (0, pad)).view(m, -1, group)
    scale = (xf.abs().amax(-1) / FP8_MAX).clamp_(min=1e-12)
    q = (xf / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8).view(m, -1)[:, :k]
    return q, scale


def blockwise_reference(xq: torch.Tensor, x_scale: torch.Tensor, w: Fp8Tensor, block: Shape,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """What the block-scaled matmul computes, in float32 from dequantized operands: the probe's
    and the tests' reference for `_scaled_mm_blockwise`."""
    k = xq.shape[1]
    x = xq.float() * x_scale.repeat_interleave(GROUP, 1)[:, :k]
    return (x @ dequantize_fp8(w.q, w.scale_inv, block, torch.float32).t()).to(out_dtype)


def _scaled_mm_blockwise(x: torch.Tensor, w: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] @ W^T with W [N, K] in e4m3 and 128x128 block scales, on the GPU's FP8 tensor
    cores, in the layouts torch's DeepSeek-style recipe checks for: the 1x128 activation scales
    [M, K/128] outer-dim-major; the weight's scales transposed with it, [K/128, N/128], their K
    blocks padded to a multiple of 4; and M padded to a multiple of 4 (zero rows, cut off after),
    since cuBLAS found no algorithm for other row counts (an expert's rows are any number; seen on
    an H200, benchmarks/results/gpu_check.json)."""
    m = x.shape[0]
    xq, xs = quantize_rows(F.pad(x, (0, 0, 0, -m % 4)))
    ws = F.pad(w.scale_inv, (0, -w.scale_inv.shape[1] % 4))
    return F.scaled_mm(
        xq, w.q.t(), xs.t().contiguous().t(), F.ScalingType.BlockWise1x128,
        ws.t(), F.ScalingType.BlockWise128x128, output_dtype=out_dtype,
    )[:m]


@functools.cache
def blockwise_fp8_available(device: str) -> bool:
    """Whether this process's `device` runs `_scaled_mm_blockwise` correctly: CUDA with compute
    capability 9.0+, and a probe matmul that matches `blockwise_reference` (any error or mismatch
    means no, with a warning, and the reference path is used)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (9, 0) or not hasattr(F, "scaled_mm"):
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        # the shapes an expert gives: any row count, K blocks not a multiple of 4 (768 = 6 x 128)
        x = torch.randn(5, 768, device=device, generator=gen, dtype=torch.bfloat16)
        w = Fp8Tensor(torch.randn(384, 768, device=device, generator=gen).clamp(-400, 400).to(FP8),
                      torch.rand(3, 6, device=device, generator=gen) / 100 + 1e-3)
        got = _scaled_mm_blockwise(x, w, torch.bfloat16).float()
        want = blockwise_reference(*quantize_rows(x), w, (128, 128), torch.float32)
        err = ((got - want).norm() / want.norm()).item()
        if err > 1e-2:
            log.warning("block-scaled FP8 matmul disagrees with its reference (relative error %.3g); "
                        "FP8 experts use the dequantizing path", err)
            return False
        return True
    except Exception as exc:  # noqa: BLE001 - any failure of the fast path means the reference path
        log.warning("block-scaled FP8 matmul unavailable (%r); FP8 experts use the dequantizing path", exc)
        return False


def keeps_fp8(cfg: ModelConfig, option: str) -> bool:
    """Whether this process holds its routed experts in FP8 (see the module docstring)."""
    if option not in FP8_WEIGHTS:
        raise ValueError(f"fp8_weights: {option!r} is not one of {', '.join(FP8_WEIGHTS)}")
    if option == "dequantize" or cfg.fp8_block is None:
        if option == "keep" and cfg.fp8_block is None:
            raise ValueError("fp8_weights: 'keep' needs an FP8 checkpoint (config.json has no quantization_config)")
        return False
    return option == "keep"


def fp8_linear(x: torch.Tensor, w: Fp8Tensor, block: Shape) -> torch.Tensor:
    """x [M, K] @ W^T for W [N, K] kept in FP8: block-scaled on a GPU that has it and for the
    128x128 blocks it takes, else through the exactly dequantized weight."""
    if (block == (GROUP, GROUP) and x.shape[1] % GROUP == 0 and w.q.shape[0] % GROUP == 0
            and blockwise_fp8_available(str(x.device))):
        return _scaled_mm_blockwise(x, w, x.dtype)
    return x @ dequantize_fp8(w.q, w.scale_inv, block, x.dtype).t()


class Fp8Experts:
    """One MoE layer's experts in FP8 (all of them, or an expert group's slots): gate, up and
    down stacks in the hub's [out, in] layout with their block scales ([S, I, H], [S, I, H],
    [S, H, I]). Gate and up stay separate so that a ragged last block of either keeps its scale.
    Callable like `LocalExperts` (x, ids, weights); `run_sorted` serves an exchange's rows."""

    def __init__(self, cfg: ModelConfig, num_slots: int, device: str | torch.device) -> None:
        assert cfg.fp8_block is not None
        self.block = cfg.fp8_block
        h, i = cfg.hidden_size, cfg.moe_intermediate_size

        def stack(rows: int, cols: int) -> Fp8Tensor:
            return Fp8Tensor(torch.empty(num_slots, rows, cols, dtype=FP8, device=device),
                             torch.empty(num_slots, *scale_shape((rows, cols), self.block), device=device))

        self.gate, self.up, self.down = stack(i, h), stack(i, h), stack(h, i)

    @property
    def num_slots(self) -> int:
        return self.gate.q.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for w in (self.gate, self.up, self.down) for t in w]

    def fills(self, cfg: ModelConfig, layer: int, slots: Sequence[int]) -> dict[str, Callable[[Fp8Tensor], None]]:
        """Where each hub tensor of this layer's experts goes (an expert held in several slots,
        a redundant copy, fills each); the checkpoint yields them as (q, scale_inv) pairs."""
        by_expert: dict[int, list[int]] = {}
        for s, e in enumerate(slots):
            by_expert.setdefault(e, []).append(s)
        out = {}
        for e, mine in by_expert.items():
            p = f"model.layers.{layer}.mlp.experts.{e}."
            for name, w in (("gate_proj", self.gate), ("up_proj", self.up), ("down_proj", self.down)):
                out[p + f"{name}.weight"] = _fill(w, mine)
        return out

    def expert(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of slot s over rows x [N, H]."""
        gate = fp8_linear(x, Fp8Tensor(self.gate.q[s], self.gate.scale_inv[s]), self.block)
        up = fp8_linear(x, Fp8Tensor(self.up.q[s], self.up.scale_inv[s]), self.block)
        act = silu_mul(torch.cat([gate, up], dim=-1))
        return fp8_linear(act, Fp8Tensor(self.down.q[s], self.down.scale_inv[s]), self.block)

    def run_sorted(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by slot, `counts[s]` of them for slot s: each row's expert output."""
        out = torch.empty_like(xs)
        start = 0
        for s, n in enumerate(counts):
            if n:
                out[start : start + n] = self.expert(s, xs[start : start + n])
                start += n
        return out

    def fused(self, gpu: ModuleType, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              valid: torch.Tensor | None, usage: torch.Tensor) -> torch.Tensor:
        """The grouped Triton kernel over the FP8 weights as stored (dequantized in registers)."""
        return gpu.fused_moe_fp8(x, ids, weights, self.gate, self.up, self.down, self.block, valid=valid, usage=usage)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        order, counts = sort_by_expert(ids, self.num_slots)
        out = self.run_sorted(x[order // ids.shape[1]], counts)
        return weighted_sum_back(x, out, order, weights)


def _fill(w: Fp8Tensor, slots: list[int]) -> Callable[[Fp8Tensor], None]:
    def fill(t: Fp8Tensor) -> None:
        for s in slots:
            w.q[s].copy_(t.q)
            w.scale_inv[s].copy_(t.scale_inv)
    return fill
