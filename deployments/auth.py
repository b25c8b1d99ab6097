"""API keys for both APIs: from the config and from $Q3SERVE_API_KEYS (comma-separated, e.g. a
Kubernetes Secret mounted as an environment variable). No keys means open. Keys are compared
in constant time."""

from __future__ import annotations

import hmac
import os

ENV_VAR = "Q3SERVE_API_KEYS"


def load_keys(configured: list[str]) -> list[str]:
    env = [k.strip() for k in os.environ.get(ENV_VAR, "").split(",") if k.strip()]
    return [k for k in dict.fromkeys([*configured, *env]) if k]


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self.keys = [k.encode() for k in keys]

    def check(self, authorization: str | None) -> bool:
        """True when auth is off, or the header is `Bearer <a configured key>`."""
        if not self.keys:
            return True
        if not authorization or not authorization.startswith("Bearer "):
            return False
        given = authorization[len("Bearer "):].strip().encode()
        ok = False
        for key in self.keys:  # compare against every key, so timing says nothing about which matched
            ok |= hmac.compare_digest(given, key)
        return ok
