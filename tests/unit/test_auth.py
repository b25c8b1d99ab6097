"""API keys: from config and environment, constant-time check, open when none; the CLI warns
when an open server listens beyond loopback."""

from __future__ import annotations

import pytest

from deployments.auth import ENV_VAR, ApiKeys, load_keys
from deployments.cli import exposure_warning


def test_keys_from_config_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, " k2 , ,k3")
    assert load_keys(["k1", "k2"]) == ["k1", "k2", "k3"]
    monkeypatch.delenv(ENV_VAR)
    assert load_keys([]) == []


def test_check() -> None:
    keys = ApiKeys(["alpha", "beta"])
    assert keys.check("Bearer beta") and keys.check("Bearer alpha")
    assert not keys.check("Bearer gamma") and not keys.check("beta") and not keys.check(None) and not keys.check("Bearer ")
    assert ApiKeys([]).check(None)  # no keys: open


def test_exposure_warning() -> None:
    assert exposure_warning("127.0.0.1", []) is None
    assert exposure_warning("0.0.0.0", ["k"]) is None
    assert "0.0.0.0" in exposure_warning("0.0.0.0", [])
