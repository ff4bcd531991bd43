"""bench --engine sparse-cpu: the sparse-cpu export in sparsedeploy's kernels against the dense export in ONNX
Runtime, alternating in one process; what it refuses."""

from __future__ import annotations

import pytest

from sparsedeploy.bench.config import BenchConfig, round_trip_note
from sparsedeploy.bench.report import markdown
from sparsedeploy.bench.run import run_bench
from sparsedeploy.common.errors import UserError
from sparsedeploy.export.run import ExportConfig, export_checkpoint


def short_bench(model, baseline, **options) -> BenchConfig:
    return BenchConfig(
        model=str(model), baseline=str(baseline), engine="sparse-cpu", prompt_len=8, gen_len=4, rounds=2, **options
    )


def test_bench_sparse_cpu_times_the_export_against_the_dense_one(sparse_cpu_export, tmp_path):
    checkpoint, out, _report = sparse_cpu_export
    dense = tmp_path / "dense"
    export_checkpoint(ExportConfig(model=str(checkpoint), verify=False), dense)
    result = run_bench(short_bench(out, dense, batches=[1, 2], warmup=1))
    rows = result["rows"]
    assert {(r["variant"], r["batch"], r["phase"]) for r in rows} >= {
        (v, b, p) for v in ("dense", "sparse") for b in (1, 2) for p in ("prefill", "decode", "total")
    }
    assert all(r["engine"] == "sparse-cpu" and r["median_s"] > 0 for r in rows)
    assert result["notes"]["kernels"]["sparse_linear_nodes"] == 8
    assert "sparse-ort-op" not in {r["variant"] for r in rows}
    assert "core_round_trip_ns" not in result["machine"]  # one thread: nothing moves between threads
    two = run_bench(short_bench(out, dense, batches=[1], warmup=1, threads=2))
    before, after = two["machine"]["core_round_trip_ns"]  # how far apart the kernels' two threads sat
    assert 0 < before < 1e5 and 0 < after < 1e5
    assert f"core-to-core round trip {before:.0f} / {after:.0f} ns (before / after)" in markdown(two)
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


def test_bench_sparse_cpu_times_the_export_whole_in_onnx_runtime_too(sparse_cpu_export, ort_op_library, tmp_path):
    """--ort-op-library: the same export run whole in ONNX Runtime with the custom-op library, a third variant
    timed in the same alternating rounds, with its speedup against the dense export."""
    checkpoint, out, _report = sparse_cpu_export
    dense = tmp_path / "dense"
    export_checkpoint(ExportConfig(model=str(checkpoint), verify=False), dense)
    result = run_bench(short_bench(out, dense, batches=[1], warmup=1, ort_op_library=str(ort_op_library)))
    rows = {(r["variant"], r["phase"]): r for r in result["rows"]}
    assert set(rows) == {(v, p) for v in ("dense", "sparse", "sparse-ort-op") for p in ("prefill", "decode", "total")}
    assert all(rows[("sparse-ort-op", p)]["speedup"] > 0 for p in ("prefill", "decode", "total"))
    assert str(ort_op_library) in result["notes"]["sparse-ort-op"]
    with pytest.raises(UserError, match="--ort-op-library is for --engine sparse-cpu"):
        run_bench(BenchConfig(model=str(dense), engine="ort", batches=[1], ort_op_library=str(ort_op_library)))


def test_round_trip_note_says_when_the_threads_sat_in_different_l3_domains():
    assert round_trip_note(None, 80.0) == "core-to-core round trip not measured (one CPU)"
    assert round_trip_note(61.0, 96.0) == "core-to-core round trip 61 / 96 ns (before / after)"
    assert round_trip_note(61.0, 340.0).startswith(
        "core-to-core round trip 61 / 340 ns (before / after): the threads sat in different L3 domains"
    )
