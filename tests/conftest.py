"""Shared fixtures: a tiny random LLaMA (fast unit tests) and the real smollm2-135m (slow tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WIKITEXT_TEST = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        use_cache=False,
    )
    model = LlamaForCausalLM(config).eval()
    return model


def tiny_two_four_pair(root: Path) -> tuple[Path, Path]:
    """A tiny LLaMA wide enough for GPU 2:4 kernels, saved dense (root/dense) and pruned 2:4 by magnitude
    (root/sparse)."""
    from sparsedeploy.common.sparsity import SparsitySpec
    from sparsedeploy.prune.methods.magnitude import magnitude_prune_linears

    model = tiny_llama(hidden=128, intermediate=256)
    model.save_pretrained(root / "dense")
    magnitude_prune_linears(model, SparsitySpec.nm(2, 4))
    model.save_pretrained(root / "sparse")
    return root / "dense", root / "sparse"


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_samples():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (4, 32), generator=gen)


def tiny_tokenizer(vocab: int = 256):
    """A small word-level fast tokenizer built in the test (no download), saved with tiny checkpoints."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3 - 60)]
    words += [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    words += list(".,;:!?'\"=-")[: vocab - len(words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:vocab])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Split("", "isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny random LLaMA saved as a HF checkpoint directory with its own small tokenizer."""
    model = tiny_llama()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_decoder_kwargs(layers: int, vocab: int) -> dict:
    """The config arguments of the tiny random decoders (hidden 64, 4 heads, 2 KV heads), any LLaMA-like family."""
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


def tiny_gemma3(seed: int = 0, layers: int = 2, vocab: int = 256):
    """A tiny random Gemma 3 text model (model_type gemma3_text): a family whose windows each begin with BOS."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(**tiny_decoder_kwargs(layers, vocab), head_dim=16, sliding_window=8)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture
def tiny_gemma_checkpoint(tmp_path):
    """A tiny random Gemma 3 saved as a HF checkpoint directory with the small tokenizer (its BOS is `<s>`, 1)."""
    path = tmp_path / "tiny-gemma"
    tiny_gemma3().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    if not WIKITEXT_TEST.is_file():
        pytest.fail(f"WikiText-2 test file missing at {WIKITEXT_TEST}: tests need ../shared beside the checkout")
    return WIKITEXT_TEST


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Model cache: $SPARSEDEPLOY_CACHE if set (reused across runs), else a session temp dir."""
    env = os.environ.get("SPARSEDEPLOY_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("sdcache")


@pytest.fixture(scope="session")
def smollm(cache_dir):
    """The real smollm2-135m, loaded once per session (float32, CPU)."""
    from sparsedeploy.common.models import load_model

    return load_model("smollm2-135m", "float32", cache_dir)


@pytest.fixture(scope="session")
def ort_op_library(tmp_path_factory):
    """sparsedeploy's ONNX Runtime custom-op library, built once by scripts/build_ort_op.sh (ONNX Runtime's headers
    fetched from Debian). A machine that cannot build it skips, with the reason; CI fails instead."""
    out = tmp_path_factory.mktemp("ort_op")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_ort_op.sh"), str(out)], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        why = "the ONNX Runtime custom-op library did not build: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def smollm_wanda70_sparse_cpu(tmp_path_factory, cache_dir):
    """The real smollm2-135m pruned by Wanda to 70 % (2 calibration samples) and exported with --target sparse-cpu
    through the CLI: (checkpoint dir, export dir)."""
    root = tmp_path_factory.mktemp("smollm_sparse_cpu")
    env = {**os.environ, "SPARSEDEPLOY_CACHE": str(cache_dir)}
    for args in (
        ["prune", "--model", "smollm2-135m", "--method", "wanda", "--sparsity", "70%", "--nsamples", "2"]
        + ["--seqlen", "64", "-o", str(root / "p")],
        ["export", "--model", str(root / "p"), "--target", "sparse-cpu", "-o", str(root / "x")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "sparsedeploy", "-q", *args], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "p", root / "x"


@pytest.fixture(scope="session")
def deepsparse_env():
    """DeepSparse 1.8's own venv when it is installed; a visible skip otherwise. Tests never install it:
    installing is the explicit step `pytest -m deepsparse_install tests/runtimes/test_deepsparse_install.py`."""
    from sparsedeploy.runtimes import deepsparse_env as ds

    problem = ds.platform_problem()
    if problem:
        pytest.skip(problem)
    env = ds.find_env()
    if env is None:
        pytest.skip(
            f"DeepSparse is not installed at {ds.default_venv_dir()}: run `sparsedeploy engines install "
            "deepsparse` or `pytest -m deepsparse_install tests/runtimes/test_deepsparse_install.py` first"
        )
    return env


@pytest.fixture(scope="module")
def nm_export(tmp_path_factory):
    """A tiny LLaMA pruned 2:4 by Wanda and exported unverified: (checkpoint, export directory)."""
    from onnx_helpers import pruned_tiny_checkpoint

    from sparsedeploy.export.run import ExportConfig, export_checkpoint

    root = tmp_path_factory.mktemp("verify")
    ckpt = pruned_tiny_checkpoint(root / "ckpt", "2:4")
    export_checkpoint(ExportConfig(model=str(ckpt), verify=False), root / "onnx")
    return ckpt, root / "onnx"


def pytest_collection_modifyitems(config, items):
    """The DeepSparse install (network, ~1 min) runs only when asked for with -m deepsparse_install."""
    if "deepsparse_install" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(
        reason="installs DeepSparse from the package index: run it explicitly with -m deepsparse_install"
    )
    for item in items:
        if "deepsparse_install" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pruned_checkpoints(tmp_path_factory):
    """Two tiny LLaMAs pruned by Wanda, one unstructured 50 %, one 2:4: {"0.5": dir, "2:4": dir}."""
    from onnx_helpers import pruned_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {
        "0.5": pruned_tiny_checkpoint(root / "unstructured", "0.5"),
        "2:4": pruned_tiny_checkpoint(root / "nm", "2:4"),
    }


@pytest.fixture(scope="session")
def pruned_exports(pruned_checkpoints, tmp_path_factory):
    """pruned_checkpoints exported with default options and verified: {key: (export dir, report)}."""
    from sparsedeploy.export.run import ExportConfig, export_checkpoint

    root = tmp_path_factory.mktemp("onnx")
    return {
        key: (
            root / key.replace(":", "_"),
            export_checkpoint(ExportConfig(model=str(path)), root / key.replace(":", "_")),
        )
        for key, path in pruned_checkpoints.items()
    }


@pytest.fixture(scope="session")
def sparse_cpu_export(tmp_path_factory):
    """A tiny LLaMA pruned by Wanda to 70 % and exported with --target sparse-cpu (verified):
    (checkpoint dir, export dir, export report)."""
    from onnx_helpers import pruned_tiny_checkpoint

    from sparsedeploy.export.run import ExportConfig, export_checkpoint

    root = tmp_path_factory.mktemp("sparse_cpu")
    checkpoint = pruned_tiny_checkpoint(root / "ckpt", "0.7")
    report = export_checkpoint(ExportConfig(model=str(checkpoint), target="sparse-cpu"), root / "onnx")
    return checkpoint, root / "onnx", report


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """The tiny random LLaMA exported with KV cache by optimum (dense) plus a 50%-zeroed copy (sparse)."""
    pytest.importorskip("optimum.exporters.onnx")
    import torch
    from optimum.exporters.onnx import main_export

    root = tmp_path_factory.mktemp("tiny_onnx")
    out = {}
    for name in ("dense", "sparse"):
        model = tiny_llama()
        if name == "sparse":
            with torch.no_grad():
                for mod in model.model.layers.modules():
                    if isinstance(mod, torch.nn.Linear):
                        w = mod.weight
                        w[w.abs() < w.abs().median()] = 0
        ckpt = root / f"{name}_ckpt"
        model.config.use_cache = True
        model.save_pretrained(ckpt)
        main_export(str(ckpt), output=str(root / name), task="text-generation-with-past", do_validation=False)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """A tiny LLaMA, dense and Wanda 2:4, exported by sparsedeploy with the static forms a deepsparse or tensorrt
    bench times at batch 1 and 2, prompt 8, 4 generated tokens (listed in export_report.json static_forms)."""
    from onnx_helpers import forms_export_config, pruned_tiny_checkpoint

    from sparsedeploy.export.run import export_checkpoint

    root = tmp_path_factory.mktemp("tiny_exports")
    out = {}
    for name, sparsity in (("dense", "0"), ("sparse", "2:4")):
        ckpt = pruned_tiny_checkpoint(root / f"{name}_ckpt", sparsity)
        export_checkpoint(forms_export_config(ckpt), root / name)
        out[name] = root / name
    return out
