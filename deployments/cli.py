"""The `q3serve` command: `up` (serve the app on a local Ray cluster), `generate` (offline),
`chat` (a terminal client for a running server) and `eval` (held-out accuracy of a running server)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import httpx

from deployments.auth import load_keys
from deployments.http_client import add_server_arguments, auth_headers, served_model

if TYPE_CHECKING:
    from deployments.config import AppConfig


def _generate(args: argparse.Namespace) -> int:
    from cluster import LLM, SamplingParams  # here: the other commands need no torch

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed,
    )
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        out = llm.chat(messages, params, enable_thinking=not args.no_think)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    print(out.text)
    print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)
    llm.shutdown()
    return 0


def exposure_warning(host: str, keys: list[str]) -> str | None:
    """Open (no keys) is fine on loopback; beyond it, say so."""
    if keys or host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"no API keys are configured and the server listens on {host}: anyone who can reach it can use it "
            "(set api_keys in the config or $Q3SERVE_API_KEYS)")


def _up(args: argparse.Namespace) -> int:
    """Starts Ray and Serve here, deploys the app, prints the URLs once every pool is ready,
    and stops everything on Ctrl-C."""
    import os
    import signal
    import time

    import ray
    from ray import serve

    from deployments.app import APP_NAME, apply_serve_env, build_app
    from deployments.config import AppConfig
    from deployments.host import size_for_host

    cfg = AppConfig.from_yaml(args.config) if args.config else AppConfig()
    overrides = {k: v for k, v in (("model", args.model), ("host", args.host), ("http_port", args.port),
                                   ("grpc_port", args.grpc_port)) if v is not None}
    cfg = cfg.model_copy(update=overrides)
    cfg = AppConfig.model_validate(cfg.model_dump())
    cfg = size_for_host(cfg)
    print("pools: " + ", ".join(f"{n} {p.cpu_threads} thread(s) per replica, {p.cpu_priority} priority"
                                for n, p in cfg.pools().items()), flush=True)
    if cfg.model is None:
        from cluster.default_model import default_model_path

        print(f"serving the embedded model {default_model_path()}", flush=True)
    apply_serve_env()
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=args.verbose,
             _metrics_export_port=args.metrics_port)
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C (any number of times) means: shut down cleanly
        signal.signal(sig, lambda *_: stop.update(now=True))
    try:
        from deployments.api.grpc_api import SERVICER_FUNCTIONS

        serve.start(http_options={"host": cfg.host, "port": cfg.http_port},
                    grpc_options={"port": cfg.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS})
        warning = exposure_warning(cfg.host, load_keys(cfg.api_keys))
        if warning:
            print(f"q3serve: warning: {warning}", file=sys.stderr)
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        last = ""
        while not stop["now"]:
            app = serve.status().applications.get(APP_NAME)
            states = {n: d.status.value for n, d in app.deployments.items()} if app else {}
            line = ", ".join(f"{n}: {st}" for n, st in sorted(states.items()))
            if line != last:
                print(f"loading ... {line}", flush=True)
                last = line
            if app is not None and app.status.value == "RUNNING":
                break
            if app is not None and app.status.value in ("DEPLOY_FAILED", "UNHEALTHY"):
                print(f"q3serve: error: the application failed to deploy: {app.message}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        if stop["now"]:
            return 0
        base = f"http://{cfg.host}:{cfg.http_port}"
        print(f"q3serve is up: OpenAI API {base}/v1 (model '{cfg.served_model_name}'), health {base}/health, "
              f"gRPC {cfg.host}:{cfg.grpc_port}, metrics http://127.0.0.1:{args.metrics_port}/metrics", flush=True)
        print("Ctrl-C stops it.", flush=True)
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        print("stopping ...", flush=True)
        _drain(cfg)
        serve.shutdown()
        ray.shutdown()
    return 0


def _drain(cfg: AppConfig) -> None:
    """The graceful part of stopping: the ingress refuses new requests (503) and gives those in
    flight the pools' `graceful_shutdown_timeout_s` to finish; what still runs then is cancelled
    and its clients get a retriable error event rather than a cut connection. Bounded
    throughout: a broken app does not hold up the exit."""
    from ray import serve

    from deployments.app import APP_NAME

    grace = max(p.graceful_shutdown_timeout_s for p in cfg.pools().values())
    try:
        print(f"draining: no new requests; up to {grace:g}s for those in flight", flush=True)
        cancelled = serve.get_app_handle(APP_NAME).drain.remote(grace).result(timeout_s=grace + 30)
        if cancelled:
            print(f"{cancelled} request(s) still running after {grace:g}s: ended with a retriable error", flush=True)
    except Exception as exc:  # noqa: BLE001 - the app may be half-deployed or gone; shut down anyway
        print(f"drain skipped: {type(exc).__name__}: {exc}"[:300], flush=True)


DIM, RESET = "\x1b[2m", "\x1b[0m"


def _chat(args: argparse.Namespace) -> int:
    """A terminal client: each input line is a user turn; the reply streams with its reasoning
    dimmed, then the answer. EOF or Ctrl-C ends it."""
    import json

    headers = auth_headers(args.api_key)
    model = args.model or served_model(args.url, headers)
    history: list[dict[str, str]] = []
    tty = sys.stdout.isatty()
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            history.append({"role": "user", "content": line.rstrip("\n")})
            body = {"model": model, "messages": history, "stream": True, "max_tokens": args.max_tokens,
                    "enable_thinking": not args.no_think}
            if args.thinking_budget is not None:
                body["thinking_budget"] = args.thinking_budget
            answer, reasoning_open = "", False
            with httpx.stream("POST", f"{args.url}/v1/chat/completions", json=body, headers=headers, timeout=600) as r:
                if r.status_code != 200:
                    print(f"q3serve: error: {r.read().decode()}", file=sys.stderr)
                    history.pop()
                    continue
                for raw in r.iter_lines():
                    if not raw.startswith("data: ") or raw == "data: [DONE]":
                        continue
                    for choice in json.loads(raw[6:]).get("choices", []):
                        delta = choice.get("delta", {})
                        if delta.get("reasoning_content"):
                            if not reasoning_open and tty:
                                sys.stdout.write(DIM)
                            reasoning_open = True
                            sys.stdout.write(delta["reasoning_content"])
                        if delta.get("content"):
                            if reasoning_open:
                                sys.stdout.write((RESET if tty else "") + "\n")
                                reasoning_open = False
                            answer += delta["content"]
                            sys.stdout.write(delta["content"])
                        sys.stdout.flush()
            sys.stdout.write((RESET if tty and reasoning_open else "") + "\n")
            history.append({"role": "assistant", "content": answer})
    except KeyboardInterrupt:
        pass
    return 0


def _eval(args: argparse.Namespace) -> int:
    from deployments.tools.evaluate import main as run_eval

    return run_eval(args)


def _drain_node(args: argparse.Namespace) -> int:
    """The chart's preStop hook: drain this pod's Ray node and wait for Serve to move off it."""
    import ray

    from deployments.node_drain import drain_node

    ray.init(address=args.address, log_to_driver=False)
    try:
        left = drain_node(args.node_id, args.deadline_s)
    finally:
        ray.shutdown()
    return 1 if left else 0


def _bench(args: argparse.Namespace) -> int:
    from deployments.tools.bench.run import main as run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    from deployments.tools.bench.run import add_arguments as add_bench_arguments
    from deployments.experts_cli import add_parser as add_experts_parser

    parser = argparse.ArgumentParser(prog="q3serve", description="Serve Qwen3 MoE models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="serve the app (both pools) on a local Ray cluster")
    up.add_argument("--config", default=None, help="AppConfig YAML (default: the embedded model, both pools)")
    up.add_argument("--model", default=None, help="checkpoint directory (overrides the config)")
    up.add_argument("--host", default=None)
    up.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    up.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 9000)")
    up.add_argument("--metrics-port", type=int, default=8080, help="Prometheus export port (default 8080, as KubeRay)")
    up.add_argument("--verbose", action="store_true", help="show the actors' logs")
    up.set_defaults(func=_up)
    ev = sub.add_parser("eval", help="held-out task accuracy of a running server, per mode and thinking budget")
    add_server_arguments(ev)
    ev.add_argument("--per-task", type=int, default=20, help="held-out items per task kind")
    ev.add_argument("--budgets", default="0,8,16,32,64,128", help="thinking budgets, comma-separated")
    ev.add_argument("--seed", type=int, default=1234, help="seed of the held-out set")
    ev.add_argument("--tool-items", type=int, default=None,
                    help="held-out products of the tool task, asked with and without the tool (default --per-task; 0 skips)")
    ev.add_argument("--json-items", type=int, default=None,
                    help="held-out single-digit questions of the JSON case (default --per-task; 0 skips it)")
    ev.add_argument("--add-items", type=int, default=None,
                    help="held-out additions of the add-tool case (default --tool-items; 0 skips it)")
    ev.add_argument("--concurrency", type=int, default=8)
    ev.add_argument("--max-tokens", type=int, default=512)
    ev.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ev.add_argument("--metrics-url", default="http://127.0.0.1:8080/metrics",
                    help="Prometheus export to read per-expert counts from ('' to skip)")
    ev.add_argument("--out", default="q3serve-eval.json")
    ev.add_argument("--plot", default=None, help="PNG of accuracy by thinking budget (default: --out with _budget.png; '' to skip)")
    ev.set_defaults(func=_eval)
    bench = sub.add_parser("bench", help="load a running server (OpenAI HTTP or gRPC) and report latencies as vLLM does")
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)
    dn = sub.add_parser("drain-node", help="drain this Ray node: Serve moves its replicas off, their requests finish "
                                           "(the chart's preStop hook)")
    dn.add_argument("--address", default="auto", help="Ray cluster address (default: the one this node runs)")
    dn.add_argument("--node-id", default=None, help="hex id of the node (default: this process's node)")
    dn.add_argument("--deadline-s", type=float, default=60.0,
                    help="seconds until the node goes away: Serve stops what is left by then (graceful period included)")
    dn.set_defaults(func=_drain_node)
    chat = sub.add_parser("chat", help="a terminal chat client for a running server")
    add_server_arguments(chat)
    chat.add_argument("--no-think", action="store_true", help="enable_thinking=False")
    chat.add_argument("--thinking-budget", type=int, default=None)
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.set_defaults(func=_chat)
    add_experts_parser(sub)
    gen = sub.add_parser("generate", help="generate text offline from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in Qwen3's chat template")
    gen.add_argument("--no-think", action="store_true", help="with --chat: enable_thinking=False")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError, httpx.HTTPError) as exc:
        print(f"q3serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
