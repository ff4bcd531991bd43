"""Helpers of the fault-injection tests (tests/faults): the CLI in and out of process, and what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedeploy.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    """stderr without log lines: what the user is told."""
    return [line for line in err.strip().splitlines() if line and not line.startswith(("INFO", "WARNING", "DEBUG"))]


def cli_process(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "sparsedeploy", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=kwargs.pop("cwd", REPO), **kwargs)


def prune_args(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "prune", "--model", str(model), "--sparsity", "0.5", "--calib", f"text:{calib}", "--nsamples", "2",
            "--seqlen", "16", "--device", "cpu", "--output", str(out), *extra]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


def wait_for(predicate, proc, timeout: float = 300.0, poll: float = 0.002) -> bool:
    """Poll until predicate() holds; False when the process ended first or the time ran out."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False
