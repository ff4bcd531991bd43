"""Shared fixtures: a tiny random LLaMA (fast unit tests) and the real smollm2-135m (slow tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WIKITEXT_TEST = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=256, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    return model


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_samples():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (4, 32), generator=gen)


class ByteTokenizer:
    """A stand-in tokenizer for the tiny model: one token per byte (mod vocab)."""

    def __init__(self, vocab: int = 256) -> None:
        self.vocab = vocab

    def __call__(self, text: str, return_tensors: str = "pt", verbose: bool = False):
        ids = torch.tensor([[b % self.vocab for b in text.encode("utf-8")]], dtype=torch.long)
        return type("Enc", (), {"input_ids": ids})()

    def save_pretrained(self, path) -> None:
        Path(path, "byte_tokenizer.txt").write_text("bytes\n")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny LLaMA saved as a HF checkpoint directory with a real (GPT-2 byte-level) tokenizer-free layout."""
    model = tiny_llama()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
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
    from sparsedeploy.models import load_model

    return load_model("smollm2-135m", "float32", cache_dir)
