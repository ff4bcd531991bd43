"""generate --engine sparse-cpu: greedy generation from a --target sparse-cpu export (ONNX Runtime segments +
sparsedeploy's kernels), through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys


def test_cli_generate_runs_the_sparse_cpu_export(sparse_cpu_export):
    _checkpoint, out, report = sparse_cpu_export
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsedeploy",
            "-q",
            "generate",
            "--onnx",
            str(out),
            "--prompt",
            "The capital of",
            "--max-new-tokens",
            "5",
            "--engine",
            "sparse-cpu",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["new_tokens"] >= 1 and data["engine"] == "sparse-cpu"
