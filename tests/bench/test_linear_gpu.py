"""2:4 semi-structured GPU kernels: the pruned weights are 2:4, and on CUDA the sparse kernels are right and timed."""

import pytest
import torch

from sparsedeploy.bench import linear_gpu as gk
from sparsedeploy.common.sparsity import satisfies_nm

SHAPE = gk.LinearShape("test", 256, 512, "test")


def test_pruned_weight_is_two_four_along_k():
    w = gk.pruned_weight(SHAPE, torch.float32, torch.device("cpu"))
    assert w.shape == (256, 512)
    assert satisfies_nm(w, 2, 4) and float((w == 0).float().mean()) == 0.5


def test_markdown_names_backends_modes_and_errors():
    base = {
        "shape": "s",
        "out_features": 8,
        "in_features": 8,
        "dtype": "float16",
        "tokens": 1,
        "dense_us": 5.0,
        "dense_tflops": 0.1,
    }
    rows = [
        {
            **base,
            "backend": "cusparselt",
            "mode": "eager",
            "speedup": 0.5,
            "speedup_p10": 0.4,
            "speedup_p90": 0.6,
            "noisy": False,
            "max_rel_error": 1e-3,
        },
        {
            **base,
            "backend": "cusparselt",
            "mode": "graph",
            "speedup": 1.5,
            "speedup_p10": 1.4,
            "speedup_p90": 1.6,
            "noisy": True,
            "max_rel_error": 1e-3,
        },
        {**base, "backend": "cutlass", "mode": "eager", "error": "RuntimeError: shape refused"},
    ]
    md = gk.linear_markdown(rows)
    assert "| cuSPARSELt eager | cuSPARSELt graph | max rel. error |" in md  # a backend never timed gets no column...
    assert "- CUTLASS not timed: RuntimeError: shape refused" in md  # ...but a line that says why
    assert "0.50x (0.40-0.60)" in md and "1.50x (1.40-1.60) NOISY" in md
    rows.append({**base, "tokens": 16, "backend": "cusparselt", "mode": "eager", "error": "RuntimeError: too small"})
    assert "n/a (RuntimeError: too small)" in gk.linear_markdown(rows)  # a timed backend's failure shows in its cell


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_no_backend_without_cuda():
    assert all(gk.backend_available(b) == (False, "no CUDA device") for b in gk.BACKENDS)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: 2:4 kernels not exercised here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_linear_matches_dense_and_is_timed(dtype):
    rows = gk.time_linear(SHAPE, 128, dtype, torch.device("cuda"), rounds=3, sample_s=0.001)
    assert {(r["backend"], r["mode"]) for r in rows} == {(b, m) for b in gk.BACKENDS for m in gk.MODES}
    for r in rows:
        usable, why = gk.backend_available(r["backend"])
        if usable:  # a usable backend is timed in both modes and computes the dense result
            assert "speedup" in r, r
            assert r["max_rel_error"] < 2e-2 and r["speedup"] > 0 and r["sparse_us"] > 0
        else:  # e.g. CUTLASS on Hopper: the row says why
            assert r["error"] == why
    assert any("speedup" in r for r in rows), "no 2:4 backend ran on this GPU"
