"""bench --engine sparse-cpu: the sparse-cpu export in sparsedeploy's kernels against the dense export in ONNX
Runtime, alternating in one process; what it refuses."""

from __future__ import annotations

import pytest

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.run import run_bench
from sparsedeploy.common.errors import UserError
from sparsedeploy.export.run import ExportConfig, export_checkpoint


def test_bench_sparse_cpu_times_the_export_against_the_dense_one(sparse_cpu_export, tmp_path):
    checkpoint, out, _report = sparse_cpu_export
    dense = tmp_path / "dense"
    export_checkpoint(ExportConfig(model=str(checkpoint), verify=False), dense)
    result = run_bench(
        BenchConfig(
            model=str(out),
            baseline=str(dense),
            engine="sparse-cpu",
            batches=[1, 2],
            prompt_len=8,
            gen_len=4,
            rounds=2,
            warmup=1,
        )
    )
    rows = result["rows"]
    assert {(r["variant"], r["batch"], r["phase"]) for r in rows} >= {
        (v, b, p) for v in ("dense", "sparse") for b in (1, 2) for p in ("prefill", "decode", "total")
    }
    assert all(r["engine"] == "sparse-cpu" and r["median_s"] > 0 for r in rows)
    assert result["notes"]["kernels"]["sparse_linear_nodes"] == 8
    with pytest.raises(UserError, match="--target sparse-cpu"):  # the plain export has nothing for the kernels
        run_bench(
            BenchConfig(
                model=str(dense),
                baseline=str(dense),
                engine="sparse-cpu",
                batches=[1],
                prompt_len=4,
                gen_len=1,
                rounds=1,
            )
        )
    with pytest.raises(UserError, match="--baseline"):
        run_bench(
            BenchConfig(
                model=str(out), baseline=str(out), engine="sparse-cpu", batches=[1], prompt_len=4, gen_len=1, rounds=1
            )
        )
