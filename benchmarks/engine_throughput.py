"""Engine vs transformers `generate`: output tokens/s on two random-weight checkpoints, in one
invocation, same threads, same prompts (64 random ids), 128 greedy output tokens each; each
engine runs `--repeats` times, alternating, and its best run counts.

    python -m benchmarks.engine_throughput [--models a b] [--concurrency 1 16 64] [--out PATH]

(a) overhead-bound: hidden 256, 4 layers, 16 experts top-4, moe_intermediate 128, vocab 4096.
(b) realistic: Qwen3's vocabulary (151,936), hidden 512, 8 layers, 32 experts top-4.
Also writes a per-step time breakdown for (b) and this machine's matmul and memory-bandwidth
floor for the lm_head.

    python -m benchmarks.engine_throughput --part sampling [--out PATH]
    python -m benchmarks.engine_throughput --part structured [--out PATH]

Sampled decoding beside greedy, engine only, on (a), (b) and the embedded default model: greedy,
Qwen3's recommended non-thinking sampling (temperature 0.7, top_p 0.8, top_k 20) and temperature
alone (1.0, the full vocabulary), alternating, best of --repeats; with the time the sampler takes
per step in each.

Structured outputs (--part structured): every row constrained (a JSON schema of an object with
an array of at least 400 strings, and a regex of 4000 characters: no row can complete early) beside the same rows unconstrained, Qwen3's
non-thinking sampling, on (b) and the embedded model: tokens/s, and per step the engine's bitmask
fill (xgrammar, per row) and the runner's batched mask, against the whole step.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from cluster import LLM, SamplingParams
from cluster.config import StructuredOutput
from cluster import native
from cluster.model import profiler

MODELS = {
    "a": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, intermediate_size=512),
    "b": dict(vocab_size=151936, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
              head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256, intermediate_size=1024),
}
PROMPT_LEN, OUTPUT_LEN = 64, 128


def make_checkpoint(path: Path, spec: dict) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**spec, norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False)
    Qwen3MoeForCausalLM(cfg).eval().save_pretrained(path)
    return path


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, vocab, (n, PROMPT_LEN), generator=g).tolist()


SAMPLING = {
    "greedy": dict(temperature=0.0),
    "qwen3_non_thinking": dict(temperature=0.7, top_p=0.8, top_k=20),
    "temperature_only": dict(temperature=1.0),
}


CONSTRAINTS = {
    "none": None,
    # long enough that no row can complete (and stop) within OUTPUT_LEN tokens
    "json_schema": StructuredOutput("json_schema", json.dumps(
        {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}, "minItems": 400}},
         "required": ["notes"]})),
    "regex": StructuredOutput("regex", "[a-z ,.]{4000}"),
}


def run_ours(llm: LLM, batch: list[list[int]], sampling: dict | None = None,
             structured: StructuredOutput | None = None) -> float:
    params = SamplingParams(max_tokens=OUTPUT_LEN, ignore_eos=True, structured_output=structured,
                            **(sampling or SAMPLING["greedy"]))
    start = time.perf_counter()
    outs = llm.generate(batch, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == OUTPUT_LEN for o in outs)
    return len(batch) * OUTPUT_LEN / elapsed


def run_hf(model, batch: list[list[int]]) -> float:
    ids = torch.tensor(batch)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT_LEN, min_new_tokens=OUTPUT_LEN,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == PROMPT_LEN + OUTPUT_LEN
    return len(batch) * OUTPUT_LEN / elapsed


def step_breakdown(llm: LLM, batch: list[list[int]], sampling: dict | None = None) -> dict:
    """Seconds per section over a whole generation, from the engine's opt-in section timers."""
    core = llm.core
    for p in batch:
        core.add_request(p, SamplingParams(max_tokens=OUTPUT_LEN, ignore_eos=True, **(sampling or SAMPLING["greedy"])))
    profiler.enable()
    steps, total = 0, 0.0
    while core.has_work():
        t = time.perf_counter()
        core.step()
        total += time.perf_counter() - t
        steps += 1
    sections = profiler.disable()
    sections["rest"] = total - sum(sections.values())
    return {
        "concurrency": len(batch), "steps": steps, "step_ms": 1e3 * total / steps,
        "fraction": {k: round(v / total, 4) for k, v in sections.items()},
        "ms_per_step": {k: round(1e3 * v / steps, 3) for k, v in sections.items()},
    }


def _seconds(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def machine_floor(spec: dict) -> dict:
    """Matmul rate and memory bandwidth of this machine, and what they imply for the lm_head:
    PyTorch's float32 matmul (MKL, what transformers runs) and the engine's native one."""
    h, v = spec["hidden_size"], spec["vocab_size"]
    w = torch.randn(v, h)
    w_t = w.t().contiguous()
    kernels = native.kernels()
    out = {}
    for batch in (1, 16, 64):
        x = torch.randn(batch, h)
        dt = _seconds(lambda: torch.nn.functional.linear(x, w))
        out[f"lm_head_ms_batch{batch}"] = round(dt * 1e3, 3)
        out[f"lm_head_gflops_batch{batch}"] = round(2 * batch * h * v / dt / 1e9, 1)
        if kernels is not None:
            dt = _seconds(lambda: kernels.linear(x, w_t))
            out[f"native_lm_head_ms_batch{batch}"] = round(dt * 1e3, 3)
            out[f"native_lm_head_gflops_batch{batch}"] = round(2 * batch * h * v / dt / 1e9, 1)
    big = torch.ones(64 << 20)  # 256 MB, written so that its pages are real (not the zero page)
    dst = torch.zeros_like(big)
    out["copy_bandwidth_gb_s"] = round(2 * big.numel() * 4 / _seconds(lambda: dst.copy_(big), 5) / 1e9, 1)
    read = big.numel() * 4 / _seconds(lambda: big.sum(), 5)
    out["read_bandwidth_gb_s"] = round(read / 1e9, 1)
    out["lm_head_weight_mb"] = round(h * v * 4 / 1e6, 1)
    out["lm_head_read_floor_ms"] = round(h * v * 4 / read * 1e3, 2)  # batch 1 cannot beat reading it once
    return out


def sampled_vs_greedy(models: list[str], concurrency: list[int], repeats: int, tmp: Path) -> list[dict]:
    """Engine tokens/s per sampling setting, alternating settings within each repeat."""
    from cluster.default_model import default_model_path

    rows = []
    for name in models:
        if name == "default":
            path, vocab = default_model_path(), 151936
        else:
            path, vocab = make_checkpoint(tmp / name, MODELS[name]), MODELS[name]["vocab_size"]
        llm = LLM(path, dtype="float32", max_num_seqs=64, max_num_batched_tokens=4096,
                  kv_cache_memory_gb=1.0, enable_prefix_caching=False)
        run_ours(llm, prompts(2, vocab))
        for c in concurrency:
            batch = prompts(c, vocab)
            best = dict.fromkeys(SAMPLING, 0.0)
            for _ in range(repeats):
                for key, sampling in SAMPLING.items():
                    best[key] = max(best[key], run_ours(llm, batch, sampling))
            row = {"model": name, "concurrency": c, **{f"{k}_tok_s": round(v, 1) for k, v in best.items()}}
            for key in SAMPLING:
                if key != "greedy":
                    row[f"{key}_vs_greedy"] = round(best[key] / best["greedy"], 3)
            row["sampling_ms_per_step"] = {
                key: step_breakdown(llm, batch, sampling)["ms_per_step"].get("sampling", 0.0)
                for key, sampling in SAMPLING.items()}
            print(json.dumps(row), flush=True)
            rows.append(row)
        llm.shutdown()
    return rows


def structured_cost(models: list[str], concurrency: list[int], repeats: int, tmp: Path) -> list[dict]:
    """Tokens/s with every row constrained against none, alternating, best of `repeats`; and the
    per-step milliseconds of the engine's bitmask fill and the runner's mask, against the step."""
    from cluster.default_model import default_model_path

    sampling = SAMPLING["qwen3_non_thinking"]
    rows = []
    for name in models:
        path = default_model_path() if name == "default" else make_checkpoint(tmp / name, MODELS[name])
        llm = LLM(path, dtype="float32", max_num_seqs=64, max_num_batched_tokens=4096,
                  kv_cache_memory_gb=1.0, enable_prefix_caching=False)
        for so in CONSTRAINTS.values():  # builds the grammar compiler and compiles each grammar (cached after)
            run_ours(llm, prompts(2, 151936), sampling, so)
        for c in concurrency:
            batch = prompts(c, 151936)
            best = dict.fromkeys(CONSTRAINTS, 0.0)
            for _ in range(repeats):
                for key, so in CONSTRAINTS.items():
                    best[key] = max(best[key], run_ours(llm, batch, sampling, so))
            row: dict = {"model": name, "concurrency": c, **{f"{k}_tok_s": round(v, 1) for k, v in best.items()}}
            for key, so in CONSTRAINTS.items():
                if so is None:
                    continue
                row[f"{key}_vs_none"] = round(best[key] / best["none"], 3)
                llm.core.grammar_s = 0.0
                for p in batch:
                    llm.core.add_request(p, SamplingParams(max_tokens=OUTPUT_LEN, ignore_eos=True, structured_output=so,
                                                           **sampling))
                profiler.enable()
                steps, total = 0, 0.0
                while llm.core.has_work():
                    t = time.perf_counter()
                    llm.core.step()
                    total += time.perf_counter() - t
                    steps += 1
                sections = profiler.disable()
                row[f"{key}_ms_per_step"] = {
                    "step": round(1e3 * total / steps, 3),
                    "grammar_engine": round(1e3 * llm.core.grammar_s / steps, 3),  # bitmask fills + token accepts
                    "mask_apply_runner": round(1e3 * sections.get("structured_mask", 0.0) / steps, 3)}
                row[f"{key}_share_of_step"] = round((llm.core.grammar_s + sections.get("structured_mask", 0.0)) / total, 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
        llm.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("transformers", "sampling", "structured"), default="transformers",
                    help="transformers: greedy engine vs transformers; sampling: sampled vs greedy, engine only")
    ap.add_argument("--models", nargs="+", default=None, help="default: a b (transformers), a b default (sampling)")
    ap.add_argument("--concurrency", nargs="+", type=int, default=None, help="default: 1 16 64 / 16 64")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per engine; the best counts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = Path(__file__).parent / "results"
    if args.part == "structured":
        from deployments.tools.machine import describe_machine

        out = Path(args.out or results / "engine_structured.json")
        with tempfile.TemporaryDirectory() as tmp:
            rows = structured_cost(args.models or ["b", "default"], args.concurrency or [16, 64], args.repeats, Path(tmp))
        out.write_text(json.dumps({
            "machine": describe_machine(), "threads": args.threads, "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN,
            "dtype": "float32", "repeats": args.repeats, "native_kernels": native.kernels() is not None,
            "sampling": SAMPLING["qwen3_non_thinking"],
            "constraints": {k: None if v is None else {"kind": v.kind, "spec": v.spec} for k, v in CONSTRAINTS.items()},
            "runs": rows}, indent=2) + "\n")
        print(f"wrote {out}")
        return
    if args.part == "sampling":
        from deployments.tools.machine import describe_machine

        out = Path(args.out or results / "engine_sampling.json")
        with tempfile.TemporaryDirectory() as tmp:
            rows = sampled_vs_greedy(args.models or ["a", "b", "default"], args.concurrency or [16, 64],
                                     args.repeats, Path(tmp))
        out.write_text(json.dumps({
            "machine": describe_machine(), "threads": args.threads, "prompt_len": PROMPT_LEN,
            "output_len": OUTPUT_LEN, "dtype": "float32", "repeats": args.repeats,
            "native_kernels": native.kernels() is not None, "sampling": SAMPLING, "runs": rows}, indent=2) + "\n")
        print(f"wrote {out}")
        return
    args.models = args.models or ["a", "b"]
    args.concurrency = args.concurrency or [1, 16, 64]
    args.out = args.out or str(results / "engine_throughput.json")
    from transformers import AutoModelForCausalLM

    result: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version()},
        "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN, "dtype": "float32", "repeats": args.repeats,
        "native_kernels": native.kernels() is not None, "runs": [],
    }
    try:
        import transformers
        result["machine"]["transformers"] = transformers.__version__
        with open("/proc/cpuinfo") as f:
            result["machine"]["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        result["machine"]["cores"] = len(__import__("os").sched_getaffinity(0))
    except (OSError, StopIteration):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            spec = MODELS[name]
            path = make_checkpoint(Path(tmp) / name, spec)
            llm = LLM(path, dtype="float32", max_num_seqs=64, max_num_batched_tokens=4096,
                      kv_cache_memory_gb=1.0, enable_prefix_caching=False)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            warm = prompts(2, spec["vocab_size"])
            run_ours(llm, warm)
            run_hf(hf, warm)
            for c in args.concurrency:
                batch = prompts(c, spec["vocab_size"])
                # Alternating repeats, best of each: this VM's speed drifts by tens of percent
                # within minutes, and alternating exposes both engines to the same drift.
                hf_tps = ours = 0.0
                for _ in range(args.repeats):
                    hf_tps = max(hf_tps, run_hf(hf, batch))
                    ours = max(ours, run_ours(llm, batch))
                row = {"model": name, "concurrency": c, "q3serve_tok_s": round(ours, 1),
                       "transformers_tok_s": round(hf_tps, 1), "ratio": round(ours / hf_tps, 2)}
                print(json.dumps(row), flush=True)
                result["runs"].append(row)
            if name == "b":
                result["breakdown_b"] = [step_breakdown(llm, prompts(c, spec["vocab_size"])) for c in args.concurrency]
                result["floor_b"] = machine_floor(spec)
                print(json.dumps(result["breakdown_b"]), json.dumps(result["floor_b"]), flush=True)
            llm.shutdown()
            del hf
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
