"""Static-cache greedy generation (the form the CUDA-graph bench replays) against the model's own generation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from cli_helpers import GPU_TORCH, pair_config

from sparsedeploy.runtimes.static_cache import GenerationShape, StaticGenerator, warm_up
from tests.conftest import tiny_llama


def dynamic_greedy(model, prompt: torch.Tensor, gen_len: int) -> torch.Tensor:
    """Reference: the model with its DynamicCache, one token at a time."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(gen_len):
            out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


def test_static_generation_gives_the_dynamic_cache_tokens_and_reuses_its_buffers():
    model = tiny_llama()
    shape = GenerationShape(batch=2, prompt_len=12, gen_len=6)
    gen = StaticGenerator(model, shape, torch.device("cpu"), graphs=False)
    first, second = (torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    expected_first, expected_second = dynamic_greedy(model, first, 6), dynamic_greedy(model, second, 6)
    assert not torch.equal(expected_first, expected_second)
    assert torch.equal(gen.generate(first), expected_first)
    # the second prompt overwrites the same cache slots: nothing of the first one may leak into it
    assert torch.equal(gen.generate(second), expected_second)
    assert gen.position.item() == 12 + 6 and gen.generate(first).shape == (2, 7)


def test_every_slot_of_the_static_cache_is_used_and_no_more():
    model = tiny_llama()
    gen = StaticGenerator(model, GenerationShape(batch=1, prompt_len=5, gen_len=3), torch.device("cpu"), graphs=False)
    gen.generate(torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2)))
    keys = gen.cache.layers[0].keys
    assert keys.shape[2] == 8 and bool((keys[0, 0].abs().sum(-1) > 0).all())


def test_both_phases_run_without_a_host_sync():
    """A CUDA graph cannot hold a host sync (``.item()``, a tensor's truth value). Under FakeTensorMode those raise
    DataDependentOutputException, so both phases running there is this CPU box's check that they are capturable."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    model = tiny_llama()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.inference_mode():
        gen = StaticGenerator(
            model, GenerationShape(batch=2, prompt_len=8, gen_len=3), torch.device("cpu"), graphs=False
        )
        gen._prefill()
        gen._decode()
        # control: without an explicit cache position the model asks the cache how full it is, a host sync
        with pytest.raises(DataDependentOutputException):
            model(input_ids=gen.token, past_key_values=gen.cache, use_cache=True)


def test_decode_warm_up_rewinds_so_it_stays_inside_the_cache():
    """Before capture the decode step runs eagerly a few times; with one generated token and two warm-up runs
    it would write past the cache without rewinding to the first decode position each time."""
    model = tiny_llama()
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for gen_len in (0, 1):
            gen = StaticGenerator(
                model, GenerationShape(batch=1, prompt_len=6, gen_len=gen_len), torch.device("cpu"), graphs=False
            )
            gen.prefill(prompt)
            warm_up(gen._decode, 2, before=gen.rewind)
            assert gen.position.item() == 7
            assert torch.equal(gen.generate(prompt), dynamic_greedy(model, prompt, gen_len))
        gen.rewind()
        with pytest.raises(IndexError):  # control: without a rewind between runs the second one writes slot 7 of 7
            warm_up(gen._decode, 2)


def test_cuda_graphs_are_refused_on_cpu():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        StaticGenerator(tiny_llama(), GenerationShape(1, 4, 2), torch.device("cpu"), graphs=True)


@pytest.mark.slow
def test_static_generation_matches_the_real_model(smollm):
    model = smollm.model
    prompt = torch.randint(100, 40000, (1, 16), generator=torch.Generator().manual_seed(0))
    gen = StaticGenerator(model, GenerationShape(batch=1, prompt_len=16, gen_len=8), torch.device("cpu"), graphs=False)
    assert torch.equal(gen.generate(prompt), dynamic_greedy(model, prompt, 8))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sparsedeploy", *args], capture_output=True, text=True)


def test_cuda_graphs_flag_errors(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    proc = cli("bench", "--model", str(tmp_path / "m"), "--engine", "torch", "--cuda-graphs")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "error: --cuda-graphs needs a GPU, not --device cpu: add --device cuda or drop --cuda-graphs"
    )
    proc = cli("bench", "--model", str(tmp_path / "m"), "--engine", "ort", "--cuda-graphs")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: --cuda-graphs is for --engine torch (checkpoints on a GPU), not --engine ort: drop --cuda-graphs"
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA-graph capture not exercised here")
def test_cuda_graph_replay_gives_the_eager_tokens_with_two_four_kernels(tmp_path):
    from sparsedeploy.bench.pytorch import TorchCausalLM
    from sparsedeploy.bench.run import run_bench
    from tests.conftest import tiny_two_four_pair

    tiny_two_four_pair(tmp_path)
    dev = torch.device("cuda")
    sparse = TorchCausalLM(tmp_path / "sparse", dev, torch.float16, semi_structured=True, graphs=True)
    assert sparse.converted == 14
    shape = GenerationShape(batch=2, prompt_len=32, gen_len=8)
    prompt = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    graphed = StaticGenerator(sparse.model, shape, dev, graphs=True).generate(prompt)
    eager = StaticGenerator(sparse.model, shape, dev, graphs=False).generate(prompt)
    assert torch.equal(graphed, eager)
    config = pair_config(tmp_path, **GPU_TORCH, batches=[1, 2], prompt_len=32, gen_len=4, rounds=2, cuda_graphs=True)
    result = run_bench(config)
    assert result["notes"]["cuda_graphs"] is True and result["notes"]["semi_structured_linears"] == {
        "dense": 0,
        "sparse": 14,
    }
    rows = [r for r in result["rows"] if "speedup" in r]
    assert {(r["batch"], r["phase"]) for r in rows} == {(b, p) for b in (1, 2) for p in ("prefill", "decode", "total")}
    assert all("CUDA graph" in r["form"] for r in rows)
