"""--engine torch: the 2:4 semi-structured model on CUDA."""

from __future__ import annotations

import pytest
from cli_helpers import GPU_TORCH, pair_config

from sparsedeploy.bench.run import run_bench

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.mark.cuda
@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="no CUDA device: 2:4 model path not exercised here"
)
def test_two_four_model_on_cuda_converts_linears_and_keeps_logits(tmp_path):
    import torch

    from sparsedeploy.bench.pytorch import TorchCausalLM
    from tests.conftest import tiny_two_four_pair

    tiny_two_four_pair(tmp_path)
    dev = torch.device("cuda")
    sparse = TorchCausalLM(tmp_path / "sparse", dev, torch.float16, semi_structured=True)
    plain = TorchCausalLM(tmp_path / "sparse", dev, torch.float16, semi_structured=False)
    assert sparse.converted == 2 * 7  # every linear of both blocks (q, k, v, o, gate, up, down)
    ids = torch.randint(0, 256, (2, 64), device=dev)
    with torch.inference_mode():
        a, b = sparse.model(input_ids=ids).logits.float(), plain.model(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 2e-2 * b.abs().max()
    result = run_bench(pair_config(tmp_path, **GPU_TORCH, batches=[1], prompt_len=64, gen_len=4, rounds=2))
    assert result["notes"]["semi_structured_linears"] == {"dense": 0, "sparse": 14}
    assert {r["phase"] for r in result["rows"] if "speedup" in r} == {"prefill", "decode", "total"}
