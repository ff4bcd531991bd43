"""export --target sparse-cpu: the decoder linears stored only in the bitmask16 format, verified against PyTorch
(every zero, logits, greedy tokens) through ONNX Runtime segments + sparsedeploy's kernels."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from onnx_helpers import pruned_tiny_checkpoint

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.run import ExportConfig, export_checkpoint
from sparsedeploy.onnx.segmented import SegmentedSession
from sparsedeploy.onnx.sparse_linear import OP_TYPE
from sparsedeploy.onnx.storage import session_from_path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse_cpu")
    checkpoint = pruned_tiny_checkpoint(root / "ckpt", "0.7")
    report = export_checkpoint(ExportConfig(model=str(checkpoint), target="sparse-cpu"), root / "onnx")
    return checkpoint, root / "onnx", report


def test_export_packs_every_decoder_linear_and_verifies(pair):
    _checkpoint, out, report = pair
    assert report["verification"]["ok"], report["verification"]["problems"]
    sparsity = report["verification"]["sparsity"]
    assert sparsity["linears"] == 14 and sparsity["zeros_onnx"] == sparsity["zeros_torch"]
    assert report["verification"]["parity"]["greedy_identical"]
    assert report["sparse_cpu"]["linears"] == 14 and report["sparse_cpu"]["nodes"] == 8  # q/k/v and gate/up fused
    model = onnx.load(str(out / "model.onnx"))
    assert sum(n.op_type == OP_TYPE for n in model.graph.node) == 8
    weights = {i.name for i in model.graph.initializer}
    dense = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert dense == ["/lm_head/MatMul"]  # the decoder linears have no dense copy left; lm_head stays dense
    assert isinstance(session_from_path(out / "model.onnx"), SegmentedSession)


def test_float16_is_refused_before_work(pair, tmp_path):
    checkpoint, _out, _report = pair
    with pytest.raises(UserError, match="float32"):
        export_checkpoint(ExportConfig(model=str(checkpoint), target="sparse-cpu", dtype="float16"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_dense_model_is_refused_and_nothing_written(tmp_path):
    checkpoint = pruned_tiny_checkpoint(tmp_path / "dense", "0.1")  # below the packing threshold everywhere
    with pytest.raises(UserError, match="no decoder linear"):
        export_checkpoint(ExportConfig(model=str(checkpoint), target="sparse-cpu"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_generate_runs_the_sparse_cpu_export(pair):
    _checkpoint, out, report = pair
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


def test_bench_sparse_cpu_times_the_export_against_the_dense_one(pair, tmp_path):
    from sparsedeploy.bench.config import BenchConfig
    from sparsedeploy.bench.run import run_bench

    checkpoint, out, _report = pair
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
