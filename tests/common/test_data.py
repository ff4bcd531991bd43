import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_tokenizer

from sparsedeploy.common.data import calibration_samples, load_text, strip_bos, wikitext_rows_joined, window_bos
from sparsedeploy.common.errors import UserError


def test_wikitext_rows_joined_matches_hf_rows():
    raw = " = Title = \n \n Some text .\n"
    # HF rows: " = Title = \n", "", " Some text .\n"  joined by blank lines
    assert wikitext_rows_joined(raw) == " = Title = \n\n\n\n\n Some text .\n"


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(f"text:{tmp_path / 'a.txt'}") == "hello world"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(f"jsonl:{tmp_path / 'b.jsonl'}") == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert load_text(f"jsonl:{tmp_path / 'c.jsonl'}#body") == "x"


@pytest.mark.parametrize(
    "source,match",
    [
        ("text:/nonexistent/file.txt", "does not exist"),
        ("bogus", "unknown text source"),
        ("jsonl:{tmp}/bad.jsonl", "not valid JSON"),
        ("jsonl:{tmp}/nokey.jsonl", "no string field"),
    ],
)
def test_source_errors(tmp_path, source, match):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "nokey.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=match) as err:
        load_text(source.format(tmp=tmp_path))
    assert "\n" not in str(err.value)


def test_calibration_windows_are_reproducible_and_from_the_text(tmp_path):
    text = " ".join(f"w{i}" for i in range(150)) + " abc"
    (tmp_path / "t.txt").write_text(text)
    tok = tiny_tokenizer()
    a = calibration_samples(tok, f"text:{tmp_path / 't.txt'}", 5, 16, seed=3)
    b = calibration_samples(tok, f"text:{tmp_path / 't.txt'}", 5, 16, seed=3)
    c = calibration_samples(tok, f"text:{tmp_path / 't.txt'}", 5, 16, seed=4)
    assert a.shape == (5, 16) and torch.equal(a, b) and not torch.equal(a, c)
    full = tok(text, return_tensors="pt").input_ids[0].tolist()
    for row in a.tolist():
        assert any(full[s : s + 16] == row for s in range(len(full) - 15))


def test_calibration_text_too_short(tmp_path):
    (tmp_path / "t.txt").write_text("w1 w2 w3")
    with pytest.raises(UserError, match="too few for one window"):
        calibration_samples(tiny_tokenizer(), f"text:{tmp_path / 't.txt'}", 4, 64)


def test_gensim_wiki_is_real_english_text():
    text = load_text("gensim-wiki")
    assert len(text) > 1_000_000
    assert "Anarchism" in text and "#REDIRECT" not in text and "'''" not in text


def test_gensim_wiki_text_is_cached_and_reused(tmp_path, monkeypatch):
    from sparsedeploy.common.data import GENSIM_WIKI_CACHE

    monkeypatch.setenv("SPARSEDEPLOY_CACHE", str(tmp_path))
    text = load_text("gensim-wiki")
    cached = tmp_path / "data" / GENSIM_WIKI_CACHE
    assert cached.read_text(encoding="utf-8") == text
    cached.write_text("from the cache", encoding="utf-8")  # the second call reads the cache, not the dump
    assert load_text("gensim-wiki") == "from the cache"


def _config(kind: str):
    import transformers as t

    return {
        "gemma": t.GemmaConfig,
        "gemma2": t.Gemma2Config,
        "gemma3": t.Gemma3Config,  # the multimodal wrapper's model_type
        "gemma3_text": t.Gemma3TextConfig,
        "llama": t.LlamaConfig,
        "mistral": t.MistralConfig,
        "qwen2": t.Qwen2Config,
    }[kind]()


@pytest.mark.parametrize(
    "kind,needs_bos",
    [("gemma", True), ("gemma2", True), ("gemma3", True), ("gemma3_text", True), ("llama", False), ("mistral", False)]
    + [("qwen2", False)],
)
def test_window_bos_only_for_the_families_that_need_it(kind, needs_bos):
    model = SimpleNamespace(config=_config(kind))
    assert model.config.model_type == kind
    assert window_bos(model, tiny_tokenizer()) == (1 if needs_bos else None)  # the tokenizer's BOS, `<s>`


def test_window_bos_falls_back_to_the_config_then_refuses():
    no_bos = SimpleNamespace(bos_token_id=None)
    assert window_bos(SimpleNamespace(config=_config("gemma3_text")), no_bos) == 2  # Gemma's config default
    config = _config("gemma2")
    config.bos_token_id = None
    with pytest.raises(UserError, match="need a BOS token before every window") as err:
        window_bos(SimpleNamespace(config=config), no_bos)
    assert "\n" not in str(err.value)
    assert window_bos(SimpleNamespace(config=_config("llama")), no_bos) is None  # LLaMA never asks


def test_calibration_windows_with_bos_are_bos_then_text(tmp_path):
    """Gemma protocol: each window is BOS + (seqlen - 1) consecutive text tokens, still seqlen long; without a BOS
    the windows are exactly the plain Wanda/SparseGPT ones (same seed, same starts)."""
    text = " ".join(f"w{i}" for i in range(150)) + " abc"
    (tmp_path / "t.txt").write_text(text)
    tok = tiny_tokenizer()
    source = f"text:{tmp_path / 't.txt'}"
    with_bos = calibration_samples(tok, source, 5, 16, seed=3, bos=1)
    assert with_bos.shape == (5, 16) and with_bos[:, 0].tolist() == [1] * 5
    full = tok(text, return_tensors="pt").input_ids[0].tolist()
    assert 1 not in full  # the BOS in the windows comes from the protocol, not from the text
    for row in with_bos[:, 1:].tolist():
        assert any(full[s : s + 15] == row for s in range(len(full) - 14))
    plain = calibration_samples(tok, source, 5, 16, seed=3)
    assert (plain[:, 0] != 1).all() and torch.equal(plain, calibration_samples(tok, source, 5, 16, seed=3, bos=None))


def test_strip_bos_drops_only_a_leading_bos():
    assert strip_bos(torch.tensor([1, 5, 1, 6]), 1).tolist() == [5, 1, 6]
    assert strip_bos(torch.tensor([5, 1, 6]), 1).tolist() == [5, 1, 6]
    assert strip_bos(torch.tensor([], dtype=torch.long), 1).numel() == 0
