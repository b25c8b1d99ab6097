"""Decode against the read floor on one GPU (issue 32): one prepared run, no Ray, no network, no
checkpoint file.

A model with Qwen3-30B-A3B's shapes and all 48 layers is built in place with random bf16 weights,
its KV cache filled at random and its step plans built directly. At 1, 16 and 64 sequences of
1,024-token context (and 5 and 40, which fill a bucket with padding rows), in one process on the
same weights, it times
  (a) `eager`: the eager path (inputs from lists, gather + SDPA, per-op norms, grouped_mm experts),
  (b) `graphs`: CUDA graphs over the sync-free static step, on the same PyTorch ops,
  (c) `graphs+kernels`: the same with the Triton kernels (cluster/kernels/gpu),
  (d) `fp8`: (c) with the routed experts kept in FP8 (made after the bf16 experts are freed, so
      that the run fits an H100's 80 GB),
and reports for each the step time, the read floor (benchmarks/floor.py) and the ratio, kernel
launches and host syncs per step, and the largest logit difference from (a) on the same plan.
benchmarks/results/decode_floor.json is written after every section, so a run cut short still
reports what it measured.

On the device machine:  PYTHONUNBUFFERED=1 timeout 470 python3 -m benchmarks.decode_floor --out $OUT/decode_floor.json
On the CPU (the suite): python -m benchmarks.decode_floor --device cpu --layers 2 --out PATH
(tiny shapes, float32, short contexts; the kernel variants run where TRITON_INTERPRET=1)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.floor import QWEN3_30B, TINY, copy_bandwidth, read_bandwidth, step_read_bytes
from cluster.config import ModelConfig, SamplingParams
from cluster.engine.plan import PlanEntry, StepPlan
from cluster.kernels import gpu as triton_kernels
from cluster.model.checkpoint import Fp8Tensor
from cluster.model.experts import LocalExperts
from cluster.model.fp8 import FP8, FP8_MAX, Fp8Experts
from cluster.model.qwen3_moe import SparseMoe
from cluster.model.runner import ModelRunner
from cluster.model.weights import empty_model

RESULTS = Path(__file__).parent / "results"
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
FP8_BLOCK = (128, 128)


def build_model(spec: dict[str, Any], layers: int, dtype: torch.dtype, device: str, seed: int = 0):  # noqa: ANN201
    """The model, allocated once on the device and filled in place with random weights (std
    1/sqrt(fan-in), norms near 1): no checkpoint is written or read."""
    cfg = ModelConfig.from_dict({"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": layers, **spec})
    model = empty_model(cfg, dtype, device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2, generator=gen)
            else:
                fan_in = p.shape[-2] if p.dim() >= 2 and "embed" not in name else p.shape[-1]
                p.normal_(0.0, fan_in**-0.5, generator=gen)
    return model, cfg


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> Fp8Tensor:
    """w [E, out, in] -> e4m3 values and a float32 scale per (ragged) block, each block's absolute
    max mapped to 448 (how Qwen's FP8 checkpoints are made)."""
    e, r, c = w.shape
    br, bc = block
    pr, pc = -(-r // br) * br, -(-c // bc) * bc
    padded = torch.zeros(e, pr, pc, dtype=torch.float32, device=w.device)
    padded[:, :r, :c] = w
    blocks = padded.view(e, pr // br, br, pc // bc, bc)
    scale = (blocks.abs().amax(dim=(2, 4)) / FP8_MAX).clamp_min(1e-12)
    q = (blocks / scale[:, :, None, :, None]).view(e, pr, pc)[:, :r, :c].to(FP8)
    return Fp8Tensor(q.contiguous(), scale)


def to_fp8_experts(model, cfg: ModelConfig, device: str) -> None:  # noqa: ANN001
    """Each layer's bf16 experts replaced by FP8 ones quantized from them, one layer at a time
    (the bf16 stack freed before the next), so the peak is one layer above the bf16 model."""
    fcfg = dataclasses.replace(cfg, fp8_block=FP8_BLOCK)
    i = cfg.moe_intermediate_size
    for layer in model.layers:
        moe = layer.mlp
        if not isinstance(moe, SparseMoe) or not isinstance(moe.experts, LocalExperts):
            continue
        old = moe.experts
        fp8 = Fp8Experts(fcfg, cfg.num_experts, device)
        for dst, src in ((fp8.gate, old.w_gate_up[:, :, :i]), (fp8.up, old.w_gate_up[:, :, i:]), (fp8.down, old.w_down)):
            q = quantize_blocks(src.transpose(1, 2).float())  # input-major -> the hub's [out, in]
            dst.q.copy_(q.q)
            dst.scale_inv.copy_(q.scale_inv)
        del moe.experts  # a registered module; FP8 experts are a plain callable
        moe.experts = fp8
        del old, q
        if device == "cuda":
            torch.cuda.empty_cache()


def plans(cfg: ModelConfig, sizes: list[int], context: int, block: int) -> dict[int, StepPlan]:
    """One decode plan per batch size: sequence j owns its own blocks, at position `context`."""
    per_seq = context // block + 1
    out = {}
    for n in sizes:
        entries = [PlanEntry(f"s{j}", [(j * 7919) % cfg.vocab_size], context,
                             list(range(j * per_seq, (j + 1) * per_seq)), SamplingParams(temperature=0))
                   for j in range(n)]
        out[n] = StepPlan(entries)
    return out


@contextmanager
def eager(runner: ModelRunner) -> Iterator[None]:
    """The runner as it stepped before this issue: no static step, syncing sampler."""
    saved = runner.static, runner.sync_free
    runner.static, runner.sync_free = None, False
    try:
        yield
    finally:
        runner.static, runner.sync_free = saved


def tap_logits(runner: ModelRunner) -> dict[str, torch.Tensor]:
    """The logits the runner's last step sampled from (under "logits": the tensor its sampler got),
    by wrapping this runner's sampling call; the runner itself keeps no step's logits."""
    seen: dict[str, torch.Tensor] = {}
    sample = runner._sample

    def tapped(plan: StepPlan, logits: torch.Tensor) -> Any:  # noqa: ANN401
        seen["logits"] = logits
        return sample(plan, logits)

    runner._sample = tapped  # type: ignore[method-assign]
    return seen


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_ms(run: Callable[[], Any], device: str, steps: int, warmup: int = 3) -> float:
    """Median of `steps` timed steps after `warmup` untimed ones (each step ends with its read of
    the sampled ids, so the host waits for the device every step)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def launches_per_step(run: Callable[[], Any], steps: int = 3) -> tuple[float, float]:
    """(host launch calls, device kernels) per step, from the torch profiler (CUDA only). A graph
    replay is one launch call however many kernels it runs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    events = prof.key_averages()
    calls = sum(e.count for e in events if e.key in LAUNCHES)
    kernels = sum(e.count for e in events if e.device_type == DeviceType.CUDA)
    return calls / steps, kernels / steps


def syncs_per_step(run: Callable[[], Any], steps: int = 3) -> float:
    """Synchronising CUDA calls per step, by torch's sync debug mode (the read of the sampled
    ids is one)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return len([w for w in caught if "synchroniz" in str(w.message)]) / steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--context", type=int, default=None, help="tokens per sequence (1024 on CUDA, 64 on the CPU)")
    ap.add_argument("--sequences", default=None, help="batch sizes (1,5,16,40,64 on CUDA; 1,5,16 on the CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (10 on CUDA, 1 on the CPU)")
    ap.add_argument("--max-model-len", type=int, default=2048, help="sets the static block tables' width")
    ap.add_argument("--out", default=str(RESULTS / "decode_floor.json"))
    args = ap.parse_args(argv)
    device = args.device
    cuda = device == "cuda"
    spec = QWEN3_30B if cuda else TINY
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter computes bf16 wrongly
    context = args.context or (1024 if cuda else 64)
    sizes = [int(n) for n in (args.sequences or ("1,5,16,40,64" if cuda else "1,5,16")).split(",")]
    steps = args.steps or (10 if cuda else 1)
    kernels_here = cuda or os.environ.get("TRITON_INTERPRET") == "1"
    out_path = Path(args.out)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "shapes": "Qwen3-30B-A3B" if cuda else "tiny", "layers": args.layers, "dtype": str(dtype).split(".")[-1],
        "context": context, "max_model_len": args.max_model_len, "rows": [], "errors": {},
    }

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")

    started = time.perf_counter()
    bandwidth = read_bandwidth(device, 1.0 if cuda else 0.25)
    result["read_bandwidth_gbs"] = round(bandwidth / 1e9, 1)
    result["copy_bandwidth_gbs"] = round(copy_bandwidth(device, 1.0 if cuda else 0.25) / 1e9, 1)
    model, cfg = build_model(spec, args.layers, dtype, device)
    block = 16
    num_blocks = max(sizes) * (context // block + 1)
    runner = ModelRunner(model, cfg, num_blocks, block, args.max_model_len, dtype, device,
                         static_decode=True, cuda_graphs=False, max_batch=max(sizes))
    sampled = tap_logits(runner)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.kv_cache.normal_()
    result["build_s"] = round(time.perf_counter() - started, 1)
    save()
    step_plans = plans(cfg, sizes, context, block)
    reference: dict[int, torch.Tensor] = {}

    def measure(variant: str, n: int, expert_bytes: float | None = None) -> None:
        plan = step_plans[n]
        run = lambda: runner.execute(plan)  # noqa: E731
        ms = step_ms(run, device, steps, warmup=3 if cuda else 1)
        logits = sampled["logits"].float().clone()
        if variant == "eager":
            reference[n] = logits
        floor = step_read_bytes(spec, args.layers, n, context, weight_bytes=dtype.itemsize,
                                expert_bytes_per_param=expert_bytes) / bandwidth * 1e3
        row: dict[str, Any] = {"variant": variant, "sequences": n, "step_ms": round(ms, 3), "floor_ms": round(floor, 3),
                               "over_floor": round(ms / floor, 2), "tokens_per_s": round(n / ms * 1e3, 1),
                               "launches": None, "kernels": None, "host_syncs": None,
                               "max_logit_diff": round((logits - reference[n]).abs().max().item(), 4)}
        if cuda:
            row["launches"], row["kernels"] = launches_per_step(run)
            row["host_syncs"] = syncs_per_step(run)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    def section(variant: str, prepare: Callable[[], Any], kernels: bool, expert_bytes: float | None = None) -> None:
        t0 = time.perf_counter()
        try:
            with triton_kernels.use(kernels, on_cpu=kernels and not cuda):
                prepare()
                for n in sizes:
                    measure(variant, n, expert_bytes)
        except Exception as exc:  # noqa: BLE001 - one failed variant must not hide the others' figures
            result["errors"][variant] = repr(exc)[:2000]
            print(variant, "failed:", repr(exc)[:2000], flush=True)
        result[f"{variant}_s"] = round(time.perf_counter() - t0, 1)
        save()

    with torch.inference_mode():
        with eager(runner):
            section("eager", lambda: None, kernels=False)
        capture = runner.static.capture if cuda else (lambda: None)  # type: ignore[union-attr]
        section("graphs", capture, kernels=False)
        if kernels_here:
            section("graphs+kernels", capture, kernels=True)

            def fp8() -> None:
                runner.static.release()  # type: ignore[union-attr]
                to_fp8_experts(model, cfg, device)
                gc.collect()
                capture()

            section("fp8", fp8, kernels=True, expert_bytes=1 + 4 / (FP8_BLOCK[0] * FP8_BLOCK[1]))
    result["total_s"] = round(time.perf_counter() - started, 1)
    if cuda:
        result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
    save()
    return result


if __name__ == "__main__":
    main()
