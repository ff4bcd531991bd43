"""The CLI run in this process (tests/cli, tests/faults) or in a fresh interpreter (tests/bench)."""

from __future__ import annotations

import subprocess
import sys

from sparsedeploy.cli import main


def run_cli(args, capsys):
    """Run `sparsedeploy ARGS` here: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli_subprocess(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m sparsedeploy ARGS` in a fresh interpreter, output captured as text."""
    return subprocess.run([sys.executable, "-m", "sparsedeploy", *args], capture_output=True, text=True, env=env)


GPU_TORCH = {"engine": "torch", "device": "cuda", "dtype": "float16"}  # bench --engine torch on a GPU, fp16


def pair_config(pair, **fields):
    """A BenchConfig timing a sparse model against its dense baseline: `pair` is {"sparse": dir, "dense": dir} or a
    directory holding `sparse/` and `dense/`."""
    from sparsedeploy.bench.config import BenchConfig

    sparse, dense = (pair["sparse"], pair["dense"]) if isinstance(pair, dict) else (pair / "sparse", pair / "dense")
    return BenchConfig(model=str(sparse), baseline=str(dense), **fields)
