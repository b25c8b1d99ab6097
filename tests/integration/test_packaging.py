"""The wheel carries everything a non-editable install needs: every module of the packages, the
native kernels' C++ sources and every file they include, the protos, and the embedded default
model with its card."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, timeout=300, capture_output=True,
    )
    (wheel,) = out.glob("q3serve-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_every_module_is_in_the_wheel(wheel_files: set[str]) -> None:
    for package in ("cluster", "deployments", "protos"):
        for f in (ROOT / package).rglob("*.py"):
            rel = f.relative_to(ROOT).as_posix()
            assert rel in wheel_files, rel


def test_the_wheel_carries_no_repository_tools(wheel_files: set[str]) -> None:
    """training/ and benchmarks/ make the default model and the committed results; a user's
    install needs neither (the layout test checks that nothing shipped imports them)."""
    tops = {name.split("/", 1)[0] for name in wheel_files if "/" in name and ".dist-info" not in name}
    assert tops == {"cluster", "deployments", "protos"}, tops


def test_native_sources_and_their_includes_are_in_the_wheel(wheel_files: set[str]) -> None:
    native = ROOT / "cluster" / "native"
    sources = sorted(native.glob("*.cpp"))
    assert sources
    for src in sources:
        assert f"cluster/native/{src.name}" in wheel_files
        for inc in re.findall(r'#include\s+"([^"]+)"', src.read_text()):
            assert (native / inc).is_file(), (src.name, inc)
            assert f"cluster/native/{inc}" in wheel_files, (src.name, inc)


def test_default_model_is_in_the_wheel(wheel_files: set[str]) -> None:
    model = ROOT / "models" / "q3serve-tiny-thinker"
    for f in model.iterdir():
        assert f"cluster/embedded_models/q3serve-tiny-thinker/{f.name}" in wheel_files, f.name
    assert "cluster/embedded_models/README.md" in wheel_files
    assert "protos/q3serve/v1/q3serve.proto" in wheel_files
