"""`q3serve bench`: sends a seeded workload to a running server at a Poisson rate (or all at once
under a concurrency limit), bounded in request count and duration, and writes every request's
timings and vLLM-style summaries per mode as JSON, with PNG plots."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deployments.tools.bench.clients import BACKENDS, Record, SamplingArgs, send_grpc, send_http
from deployments.tools.bench.faults import FAULTS, FaultConfig, Injected, outcomes, release, run_fault
from deployments.tools.bench.replan import ReplanConfig, around, run_replan
from deployments.tools.bench.summary import parse_slos, summarize_by_mode
from deployments.tools.bench.workload import RequestSpec, WorkloadConfig, arrival_offsets, make_workload

NOT_SENT = "not sent: the run's duration had passed"
REQUESTS_PER_POOL = 64  # requests per HTTP client (see run_once)


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    grpc_target: str = "127.0.0.1:9000"
    backend: str = "openai"
    model: str | None = None
    api_key: str | None = None
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    duration_s: float = 600.0       # no request is sent after this; each has timeout_s to finish
    timeout_s: float = 300.0
    label: str = "q3serve"
    only_mode: str | None = None    # send only this mode's requests, at the times the full workload has them
    slos: dict[str, float] = field(default_factory=dict)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    sampling: SamplingArgs = field(default_factory=SamplingArgs)
    fault: FaultConfig | None = None  # one fault injected while the workload runs (loopback only)
    replan: ReplanConfig | None = None  # a live expert re-plan of a pool while the workload runs


def _decoder() -> Any:
    """Qwen3's tokenizer through `tokenizers` alone: the bench client needs no torch."""
    from tokenizers import Tokenizer

    from cluster import tokenizer_dir

    tok = Tokenizer.from_file(str(tokenizer_dir(None) / "tokenizer.json"))
    return lambda ids: tok.decode(ids)


@dataclass
class _Sender:
    """What every request of a run shares: the clients, the model's name, the concurrency limit,
    the progress bar, and the end times."""

    cfg: BenchConfig
    model: str
    t0: float
    bar: Any
    pools: list[httpx.AsyncClient]
    stub: Any = None
    limit: asyncio.Semaphore | None = None
    ends: list[float] = field(default_factory=list)

    async def one(self, spec: RequestSpec, offset: float, record: Record) -> None:
        """Sends one request at its arrival time (none after the run's duration) and times it."""
        cfg = self.cfg
        await asyncio.sleep(max(0.0, self.t0 + offset - time.perf_counter()))
        if time.perf_counter() - self.t0 > cfg.duration_s:
            record.error = NOT_SENT
            self.bar.update()
            return
        if self.limit:
            await self.limit.acquire()
        try:
            record.start_s = time.perf_counter() - self.t0
            if self.stub is not None:
                metadata = [("authorization", f"Bearer {cfg.api_key}")] if cfg.api_key else []
                send = send_grpc(self.stub, cfg.backend, self.model, spec, cfg.sampling, record, cfg.timeout_s, metadata)
            else:
                send = send_http(self.pools[spec.index % len(self.pools)], cfg.backend, self.model, spec, cfg.sampling,
                                 record, cfg.timeout_s)
            await asyncio.wait_for(send, cfg.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            record.status = "timeout"
            record.error = f"timed out after {cfg.timeout_s}s"
        except (httpx.HTTPError, OSError, ValueError) as exc:
            record.status = record.status or "connection"
            record.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            if self.limit:
                self.limit.release()
            self.ends.append(time.perf_counter())
            record.end_s = self.ends[-1] - self.t0
            self.bar.update()


def _http_clients(cfg: BenchConfig, requests: int) -> list[httpx.AsyncClient]:
    """Several clients, each with its own connection pool: httpcore scans every connection of its
    pool each time a request ends, so one pool over hundreds of open streams cost the client
    most of a core (py-spy, 600 at once) and delayed what it measured."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    return [httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=cfg.timeout_s,
                              limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
            for _ in range(max(1, math.ceil(requests / REQUESTS_PER_POOL)))]


async def _model_name(cfg: BenchConfig, http: httpx.AsyncClient) -> str:
    """The served model's name: the configured one, else the server's first (gRPC alone needs none)."""
    needs_name = cfg.fault is not None or cfg.replan is not None or not cfg.backend.startswith("grpc")
    if cfg.model or not needs_name:
        return cfg.model or ""
    r = await http.get("/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _result(cfg: BenchConfig, records: list[Record], ends: list[float], t0: float, injected: Injected | None,
            replanned: dict[str, Any] | None) -> dict[str, Any]:
    sent = [r for r in records if r.error != NOT_SENT]
    duration = (max(ends) - t0) if ends else 0.0
    config = {k: v for k, v in asdict(cfg).items() if k not in ("api_key",)}
    config["request_rate"] = cfg.request_rate if cfg.request_rate != float("inf") else "inf"
    out = {"config": config, "not_sent": len(records) - len(sent),
           "summary": summarize_by_mode(sent, duration, cfg.slos or None),
           "records": [asdict(r) for r in sent]}
    if injected is not None:
        out["fault"] = outcomes(sent, injected)
    if replanned is not None:
        out["replan"] = {**replanned, "requests": around(sent, replanned) if "took_s" in replanned else None}
    return out


async def run_once(cfg: BenchConfig, specs: list[RequestSpec], progress: bool = True) -> dict[str, Any]:
    """One run at cfg.request_rate; returns {"config", "summary", "records"}."""
    from tqdm import tqdm

    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend: '{cfg.backend}' is not one of {', '.join(BACKENDS)}")
    offsets = arrival_offsets(len(specs), cfg.request_rate, cfg.workload.seed)
    records = [Record(s.index, s.mode, s.budget) for s in specs]
    chosen = [(s, o, r) for s, o, r in zip(specs, offsets, records) if cfg.only_mode in (None, s.mode)]
    bar = tqdm(total=len(chosen), desc=f"{cfg.label} @ {cfg.request_rate} req/s", disable=not progress, unit="req")
    pools = _http_clients(cfg, len(specs))
    channel = stub = None
    if cfg.backend.startswith("grpc"):
        import grpc

        from protos.q3serve.v1 import q3serve_pb2_grpc as pb_grpc

        channel = grpc.aio.insecure_channel(cfg.grpc_target)
        stub = pb_grpc.ChatServiceStub(channel)
    model = await _model_name(cfg, pools[0])
    t0 = time.perf_counter()
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    sender = _Sender(cfg, model, t0, bar, pools, stub, limit)
    fault = asyncio.create_task(run_fault(cfg.fault, pools[0], model, t0)) if cfg.fault is not None else None
    replan = asyncio.create_task(run_replan(cfg.replan, pools[0], t0)) if cfg.replan is not None else None
    injected: Injected | None = None
    replanned: dict[str, Any] | None = None
    try:
        await asyncio.gather(*(sender.one(s, o, r) for s, o, r in chosen))
        if fault is not None:
            injected = await fault  # bounded: the probes stop at the fault's recover_timeout_s
        if replan is not None:
            replanned = await replan  # bounded by its timeout
    finally:
        for task in (fault, replan):
            if task is not None and not task.done():
                task.cancel()
        bar.close()
        for client in pools:
            await client.aclose()
        if channel is not None:
            await channel.close()
        release(injected)
    return _result(cfg, [r for _, _, r in chosen], sender.ends, t0, injected, replanned)


def bench(cfg: BenchConfig, rates: list[float], progress: bool = True) -> list[dict[str, Any]]:
    """One run per rate, on the same workload."""
    specs = make_workload(cfg.workload, vocab_size=151643, decode=_decoder())
    runs = []
    for rate in rates:
        cfg.request_rate = rate
        runs.append(asyncio.run(run_once(cfg, specs, progress)))
    return runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's OpenAI HTTP API")
    p.add_argument("--grpc-target", default="127.0.0.1:9000", help="the server's gRPC host:port")
    p.add_argument("--backend", choices=BACKENDS, default="openai",
                   help="openai = /v1/completions, openai-chat = /v1/chat/completions, grpc = Generate, grpc-chat = Chat")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-rate", default="inf", help="requests/s of the Poisson arrivals; comma-separated for a sweep")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--duration", type=float, default=600.0, help="send no request after this many seconds")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    p.add_argument("--dataset", choices=("random", "tasks"), default="random",
                   help="random token prompts (as vLLM's random dataset), or the default model's task questions")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--thinking-output-len", type=int, default=None, help="a thinking request's (default: --output-len)")
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len * [1 - r, 1 + r]")
    p.add_argument("--thinking-share", type=float, default=0.0, help="fraction of requests in thinking mode")
    p.add_argument("--thinking-budgets", default="none", help="a thinking request's budget, drawn from this list ('none': unlimited)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=None, help="default: the server's")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--goodput", nargs="*", default=None, help="SLOs in ms, e.g. ttft:500 tpot:50")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="q3serve", help="the series name in the JSON and plots")
    p.add_argument("--out", default="q3serve-bench.json", help="the JSON of every request and the summaries")
    p.add_argument("--plot", default=None, help="PNG of the CDFs (default: --out with .png; '' to skip); a sweep adds -sweep.png")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fault", choices=FAULTS, default=None,
                   help="inject one fault while the workload runs (the server must run on this machine's Ray cluster)")
    p.add_argument("--fault-at", type=float, default=5.0, help="seconds after the start")
    p.add_argument("--fault-pool", choices=("thinking", "fast"), default="thinking")
    p.add_argument("--recover-timeout", type=float, default=180.0, help="seconds to wait for the pool to serve again")
    p.add_argument("--replan-at", type=float, default=None,
                   help="seconds after the start: re-plan --replan-pool's expert placement from its live counters")
    p.add_argument("--replan-pool", choices=("thinking", "fast"), default="thinking")
    p.add_argument("--replan-redundant", type=int, default=0, help="extra copies of the hottest experts per layer")


def config_from_args(args: argparse.Namespace) -> tuple[BenchConfig, list[float]]:
    budgets = tuple(None if b.strip() == "none" else int(b) for b in args.thinking_budgets.split(","))
    workload = WorkloadConfig(num_prompts=args.num_prompts, dataset=args.dataset, input_len=args.input_len,
                              output_len=args.output_len, thinking_output_len=args.thinking_output_len, range_ratio=args.range_ratio,
                              thinking_share=args.thinking_share, thinking_budgets=budgets, seed=args.seed)
    sampling = SamplingArgs(args.temperature, args.top_p, args.top_k, args.ignore_eos)
    cfg = BenchConfig(url=args.url.rstrip("/"), grpc_target=args.grpc_target, backend=args.backend, model=args.model,
                      api_key=args.api_key, max_concurrency=args.max_concurrency, duration_s=args.duration,
                      timeout_s=args.timeout, label=args.label, slos=parse_slos(args.goodput), workload=workload,
                      sampling=sampling)
    if args.fault:
        cfg.fault = FaultConfig(args.fault, args.fault_at, args.fault_pool, args.recover_timeout)
    if args.replan_at is not None:
        cfg.replan = ReplanConfig(args.replan_at, args.replan_pool, args.replan_redundant)
    rates = [float(r) for r in str(args.request_rate).split(",")]
    if any(r <= 0 for r in rates):
        raise ValueError("request-rate: must be > 0 (inf: all at once)")
    return cfg, rates


def write(runs: list[dict[str, Any]], out: Path, plot: str | None) -> None:
    from deployments.tools.machine import describe_machine
    from deployments.tools.bench.plots import plot_cdfs, plot_sweep

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": describe_machine(), "runs": runs}, indent=1) + "\n")
    if plot:
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        plot_cdfs(runs[-1], Path(plot))
        if sum(1 for r in runs if r["config"]["request_rate"] != "inf") > 1:
            plot_sweep(runs, Path(plot).with_name(Path(plot).stem + "-sweep.png"))


def main(args: argparse.Namespace) -> int:
    cfg, rates = config_from_args(args)
    runs = bench(cfg, rates, progress=not args.no_progress)
    plot = str(Path(args.out).with_suffix(".png")) if args.plot is None else args.plot or None
    write(runs, Path(args.out), plot)
    for run in runs:
        s = run["summary"]["overall"]
        print(f"{cfg.label} @ {run['config']['request_rate']} req/s: {s['completed']}/{s['num_requests']} ok, "
              f"output {s['output_throughput']:.1f} tok/s, TTFT p50/p99 {s['p50_ttft_ms']:.0f}/{s['p99_ttft_ms']:.0f} ms, "
              f"ITL p50/p99 {s['p50_itl_ms']:.0f}/{s['p99_itl_ms']:.0f} ms")
        if "fault" in run:
            f, n = run["fault"], run["fault"]["in_flight"]
            rec = f"{f['recovered_after_s']:.1f} s" if f["recovered_after_s"] is not None else "not within the timeout"
            print(f"fault {f['kind']} ({f['target']}) at {f['at_s']:.1f} s: {n['requests']} in flight, {n['completed']} "
                  f"completed, {n['failed_retriable']} retriable errors, {n['failed_other']} other errors, {n['hung']} hung, "
                  f"{f['all']['retried']} retried; the {f['pool']} pool served again after {rec}")
        if "replan" in run:
            r = run["replan"]
            if r["status"] == 200:
                n = r["requests"]
                print(f"re-plan of {r['pool']} at {r['at_s']:.1f} s took {r['took_s']:.1f} s: {n['in_flight']} requests in "
                      f"flight, {n['completed']} completed, {n['failed']} failed; largest group's tokens "
                      f"{r['before']['max_group_tokens_sum']:.0f} -> {r['after']['max_group_tokens_sum']:.0f}")
            else:
                print(f"re-plan of {r['pool']} failed: {r.get('error')}")
    print(f"wrote {args.out}")
    return 0
