"""Client side of a running server's OpenAI HTTP API, shared by `q3serve chat` and `q3serve eval`."""

from __future__ import annotations

import argparse

import httpx


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def served_model(url: str, headers: dict[str, str], timeout_s: float = 30) -> str:
    """The server's first model name (what a client asks for when it names none)."""
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout_s)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """--url, --model, --api-key: how a client subcommand finds the server."""
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
