"""Helpers of the fault-injection tests (tests/faults): the CLI in and out of process, and what it says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli  # noqa: F401 - the CLI in this process: (exit code, stdout, stderr)

REPO = Path(__file__).resolve().parents[2]


def error_lines(err: str) -> list[str]:
    """stderr without log lines: what the user is told."""
    return [line for line in err.strip().splitlines() if line and not line.startswith(("INFO", "WARNING", "DEBUG"))]


def _interruptible() -> None:
    """In the child, before exec: SIGINT back to its default, as a terminal's Ctrl-C finds a command (a test run
    started in the background of a script inherits SIGINT ignored, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_process(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.Popen(
        [sys.executable, "-m", "sparsedeploy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=kwargs.pop("cwd", REPO),
        preexec_fn=_interruptible,
        **kwargs,
    )


def prune_args(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-q",
        "prune",
        "--model",
        str(model),
        "--sparsity",
        "0.5",
        "--calib",
        f"text:{calib}",
        "--nsamples",
        "2",
        "--seqlen",
        "16",
        "--device",
        "cpu",
        "--output",
        str(out),
        *extra,
    ]


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


# Fixtures (imported by the tests that use them: a conftest.py here would shadow tests/conftest.py's
# `from conftest import ...`).


@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{i % 150} The quick brown fox." for i in range(400)))
    return path


def _mounted(point: Path, options: str):
    """Mount a real tmpfs with `options` on `point` for the test; a visible skip where mounting is not permitted."""
    point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
    if proc.returncode != 0:
        why = proc.stderr.strip() or proc.returncode
        pytest.skip(f"cannot mount a tmpfs ({options}) here (needs root or CAP_SYS_ADMIN): {why}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A real 2 MiB tmpfs mounted in the test's folder."""
    yield from _mounted(tmp_path / "small", "size=2m")


@pytest.fixture
def readonly_mount(tmp_path: Path):
    """A real read-only tmpfs (root can write anywhere else)."""
    yield from _mounted(tmp_path / "ro", "ro,size=1m")


@pytest.fixture
def deep_checkpoint(tmp_path: Path) -> Path:
    """A small random LLaMA with 12 blocks: pruning takes long enough to be interrupted between blocks."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("suite_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
    suite = importlib.util.module_from_spec(spec)  # the suite's tiny-model builders (tests/conftest.py)
    spec.loader.exec_module(suite)
    path = tmp_path / "deep"
    suite.tiny_llama(layers=12, hidden=128, intermediate=256).save_pretrained(path)
    suite.tiny_tokenizer().save_pretrained(path)
    return path
