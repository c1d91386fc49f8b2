"""The codebase stays ruff-clean, mypy --strict clean, and layered
(control > bench > datapath > loader, checked by import-linter)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("control", "loader", "datapath", "bench")


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def _run(cmd: list[str], cwd: Path = ROOT) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}{proc.stderr}"


def test_ruff_finds_nothing() -> None:
    _run([_tool("ruff"), "check", "."])


def test_ruff_format_is_applied() -> None:
    _run([_tool("ruff"), "format", "--check", "."])


def test_mypy_strict_passes(tmp_path: Path) -> None:
    # The folders are importable only as ciliate.<name> (a wheel mapping),
    # so mypy reads them through a tree of links laid out the same way.
    shim = tmp_path / "ciliate"
    shim.mkdir()
    for package in PACKAGES:
        (shim / package).symlink_to(ROOT / package)
    _run(
        [
            _tool("mypy"),
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--strict",
            "--explicit-package-bases",
            "--no-incremental",
            "-p",
            "ciliate",
        ],
        cwd=tmp_path,
    )


def test_layers_import_only_downwards() -> None:
    _run([_tool("lint-imports")])
