"""Builders shared by the ONNX tests: a tiny pruned LLaMA checkpoint with a small real tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "The capital of France is Paris. In the beginning of the twentieth century, the city grew quickly. "
    "Sparse models keep half of their weights at zero, and the rest carries the signal. "
) * 8


def tiny_tokenizer(vocab: int = 320):
    """A byte-level BPE tokenizer trained in memory on a few sentences (no network, no cache)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def pruned_tiny_checkpoint(path: Path, sparsity: str = "0.5", seed: int = 0, method: str = "wanda") -> Path:
    """A tiny random LLaMA pruned with `method` at `sparsity`, saved like `sparsedeploy prune` saves it."""
    from conftest import tiny_llama
    from safetensors.torch import save_file

    from sparsedeploy.common.files import write_json_atomic
    from sparsedeploy.common.models import LoadedModel, save_checkpoint
    from sparsedeploy.common.sparsity import parse_sparsity
    from sparsedeploy.prune.blocks import prune_model
    from sparsedeploy.prune.methods import build_method

    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    model = tiny_llama(seed=seed, vocab=vocab)
    gen = torch.Generator().manual_seed(seed + 1)
    samples = torch.randint(0, vocab, (4, 32), generator=gen)
    spec = parse_sparsity(sparsity)
    masks = prune_model(
        model, samples, build_method(method), lambda _i, _n: spec, torch.device("cpu"), show_progress=False
    )
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(LoadedModel(model, tokenizer, path), path)
    save_file({k: v.contiguous() for k, v in masks.items()}, str(path / "masks.safetensors"))
    write_json_atomic(path / "report.json", {"method": method, "sparsity_spec": str(spec)})
    return path


def forms_export_config(ckpt: Path, **fields):
    """An unverified ExportConfig that writes bench's deepsparse forms at batch 1 and 2, prompt 8, 4 generated tokens
    (tiny_exports' configuration; `fields` override it)."""
    from sparsedeploy.export.config import ExportConfig

    base = {"bench_forms": "deepsparse", "bench_batch": (1, 2), "bench_prompt_len": 8, "bench_gen_len": 4}
    return ExportConfig(model=str(ckpt), verify=False, **{**base, **fields})
