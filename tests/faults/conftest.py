"""Fault injection: each test provokes one real fault and checks the exit code, the one-line message and the disk."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{i % 150} The quick brown fox." for i in range(400)))
    return path


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A real 2 MiB tmpfs mounted in the test's folder; a visible skip where mounting is not permitted."""
    point = tmp_path / "small"
    point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip() or proc.returncode}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def readonly_mount(tmp_path: Path):
    """A real read-only tmpfs (root can write anywhere else); a visible skip where mounting is not permitted."""
    point = tmp_path / "ro"
    point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(point)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip() or proc.returncode}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


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
