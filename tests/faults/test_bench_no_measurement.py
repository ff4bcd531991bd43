"""A requested measurement that could not happen exits non-zero with the reason, and writes nothing."""

import pytest
import torch
from faultkit import error_lines, run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: this path is for machines without it")
def test_torch_on_cuda_without_cuda_is_not_a_success(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench"
    code, stdout, err = run_cli(
        ["bench", "--model", str(tiny_checkpoint), "--engine", "torch", "--device", "cuda", "-o", str(out)], capsys
    )
    lines = error_lines(err)
    assert (
        code == 2
        and len(lines) == 1
        and lines[0].startswith(
            "error: no measurement: --engine torch --device cuda: CUDA is not available on this machine"
        )
    )
    assert stdout == "" and not out.exists()
