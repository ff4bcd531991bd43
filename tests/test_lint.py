"""The layout's rules, enforced: one-way imports between the stage packages (import-linter, contracts in
pyproject.toml) and ruff's lint and format checks over the package, tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    exe = BIN / name
    if exe.is_file():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_import_contracts_are_kept():
    proc = _run([_tool("lint-imports"), "--no-cache"], REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    """A copy of the package where common/ imports the CLI: lint-imports must refuse it."""
    shutil.copytree(REPO / "sparsedeploy", tmp_path / "sparsedeploy", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "sparsedeploy" / "common" / "upward.py").write_text("from sparsedeploy.cli.main import main\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = _run([_tool("lint-imports"), "--no-cache"], tmp_path, env)
    assert proc.returncode != 0
    assert "sparsedeploy.common.upward -> sparsedeploy.cli.main" in proc.stdout


def test_ruff_lint_is_clean():
    proc = _run([_tool("ruff"), "check", "sparsedeploy", "tests", "benchmarks", "cli.py"], REPO)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_ruff_format_is_clean():
    proc = _run([_tool("ruff"), "format", "--check", "sparsedeploy", "tests", "benchmarks", "cli.py"], REPO)
    assert proc.returncode == 0, proc.stdout[-4000:]
