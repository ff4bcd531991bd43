"""benchmarks/speed_gpu.py parts that need no GPU: the speed-only model pair, and the clean exit without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_speed_only_pair_is_the_dense_model_pruned_2of4(tmp_path, cache_dir):
    import speed_gpu
    from safetensors.torch import load_file

    from sparsedeploy.common.sparsity import satisfies_nm

    speed_gpu.speed_only_llama(tmp_path / "dense", tmp_path / "sparse", cache_dir, preset="tiny")
    dense, sparse = (
        load_file(str(tmp_path / "dense" / "model.safetensors")),
        load_file(str(tmp_path / "sparse" / "model.safetensors")),
    )
    assert dense.keys() == sparse.keys() and all(t.dtype == torch.float16 for t in sparse.values())
    pruned = [k for k in sparse if ".layers." in k and k.endswith("proj.weight")]
    assert len(pruned) == 2 * 7
    for key in pruned:
        assert satisfies_nm(sparse[key], 2, 4) and (sparse[key] == 0).float().mean().item() == 0.5
        kept = sparse[key] != 0
        assert torch.equal(sparse[key][kept], dense[key][kept])  # kept weights unchanged
    assert torch.equal(sparse["lm_head.weight"], dense["lm_head.weight"])
    assert (tmp_path / "sparse" / "tokenizer.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_it_says_so_and_exits_cleanly(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed_gpu.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "CUDA" in (run.stdout + run.stderr) and not any(tmp_path.iterdir())
