"""The `q3serve` command. Today: `generate` (offline, on the embedded default model unless
--model is given). `up`, `chat` and `bench` arrive with the serving issues."""

from __future__ import annotations

import argparse
import sys

from cluster import LLM, SamplingParams


def _generate(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="q3serve", description="Serve Qwen3 MoE models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
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
    except (ValueError, FileNotFoundError) as exc:
        print(f"q3serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
