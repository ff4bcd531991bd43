"""--engine deepsparse: the not-installed error, the timed forms, and the ORT side of its generation rows."""

from __future__ import annotations

import pytest
from cli_helpers import pair_config
from cli_helpers import run_cli_subprocess as cli

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.report import markdown
from sparsedeploy.bench.run import run_bench

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def bench_tiny(tiny_exports, env, batches: list[int], gen_len: int) -> dict:
    """--engine deepsparse on tiny_exports' forms (prompt 8), one round."""
    config = pair_config(tiny_exports, engine="deepsparse", batches=batches, prompt_len=8, gen_len=gen_len, rounds=1)
    config.deepsparse_venv = str(env.path)
    return run_bench(config)


def test_deepsparse_not_installed_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "model.onnx").write_bytes(b"")
    proc = cli(
        "bench", "--model", str(tmp_path), "--engine", "deepsparse", "--deepsparse-venv", str(tmp_path / "novenv")
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and ("engines install deepsparse" in proc.stderr or "DeepSparse" in proc.stderr)


@pytest.mark.slow
def test_deepsparse_bench_times_prefill_and_decode_step_on_the_stack(tiny_exports, deepsparse_env):
    """The whole deepsparse engine path: full-graph verdict, prefill on the decoder stack, a decode step on the stack
    with a KV cache, each in DeepSparse and in ONNX Runtime on the same graph."""
    from sparsedeploy.runtimes.deepsparse_env import LICENCE_NOTE

    result = bench_tiny(tiny_exports, deepsparse_env, [2], gen_len=4)
    assert result["licence"] == LICENCE_NOTE and "stack" not in result["notes"]  # both exports list their forms
    forms = {
        (r["engine"], r["phase"], r["form"].split(" (")[0], r.get("rows")) for r in result["rows"] if "speedup" in r
    }
    assert forms == {(e, "prefill", "decoder stack", 16) for e in ("deepsparse", "ort")} | {
        (e, "decode-step", "decoder stack + KV cache", 2) for e in ("deepsparse", "ort")
    } | {
        (e, p, "whole model, stack graphs", None) for e in ("deepsparse", "ort") for p in ("prefill", "decode", "total")
    }
    full = result["notes"]["full_graph"]  # the verdict either way, with its evidence
    if full["runs"]:
        assert full["ok"] is True and full["outputs"] and full["compile_and_run_s"] > 0
    else:
        assert full["reason"].startswith("DeepSparse") and "full graph in DeepSparse: rejected: " in markdown(result)
    decode = [r for r in result["rows"] if r["phase"] == "decode"]
    assert len(decode) == 4 and all(r["tokens_per_s"] == pytest.approx(2 * 4 / r["median_s"]) for r in decode)
    assert "prompt 8 tokens, 4 generated" in markdown(result)


@pytest.mark.slow
def test_deepsparse_bench_without_generation_times_the_static_forms_only(tiny_exports, deepsparse_env):
    result = bench_tiny(tiny_exports, deepsparse_env, [1], gen_len=0)
    assert {r["phase"] for r in result["rows"]} == {"prefill", "decode-step"}
    assert "prompt 8 tokens, no generation (static forms)" in markdown(result)


def test_ort_generation_rows_hold_numpy_blas_to_the_bench_threads(tiny_checkpoint, tmp_path, monkeypatch):
    """The ORT side of the whole-generation rows runs NumPy's lm_head with --threads BLAS threads, like the
    DeepSparse worker (OMP_NUM_THREADS), so the two engines' rows pay the same NumPy cost."""
    from threadpoolctl import threadpool_info

    import sparsedeploy.runtimes.decoder_stack as sg
    from sparsedeploy.bench.deepsparse import time_ort_generation
    from sparsedeploy.runtimes.stack_graphs import write_stack_files

    seen = []

    def record(*_args, **_kwargs):
        seen.append({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
        return {"prefill": 1.0, "decode": 1.0, "total": 2.0}

    monkeypatch.setattr(sg, "generation_phases", record)
    bundles = {"dense": write_stack_files(tiny_checkpoint, tmp_path / "b", 1, 8, 12)}
    res = time_ort_generation(bundles, BenchConfig(model="x", threads=1, prompt_len=8, gen_len=4, rounds=2), 1)
    assert len(res.phases["dense"]["decode"]) == 2 and seen and all(s == {1} for s in seen)
