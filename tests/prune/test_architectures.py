"""The engine and pruning work on the decoder families found generically, not only LLaMA."""

import pytest
import torch

from sparsedeploy.common.evaluate import layer_sparsity
from sparsedeploy.prune.methods import build_method
from sparsedeploy.common.models import find_blocks
from sparsedeploy.prune.blocks import prune_model
from sparsedeploy.common.sparsity import SparsitySpec


def _model(kind: str):
    import transformers as t

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if kind == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**common, sliding_window=16))
    if kind == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**common))
    if kind == "gemma":
        return t.GemmaForCausalLM(t.GemmaConfig(**common, head_dim=16))
    if kind == "gemma2":  # alternating sliding-window / global layers: each block has its own mask
        return t.Gemma2ForCausalLM(t.Gemma2Config(**common, head_dim=16, sliding_window=8))
    if kind == "opt":
        return t.OPTForCausalLM(t.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma", "gemma2", "opt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prune_architecture(kind, dtype):
    model = _model(kind).to(dtype).eval()
    samples = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(0))
    masks = prune_model(model, samples, build_method("wanda"), lambda i, n: SparsitySpec.unstructured(0.5), torch.device("cpu"), show_progress=False)
    rows = layer_sparsity(model)
    assert len(masks) == len(rows) >= 2 * 6
    assert all(abs(r["sparsity"] - 0.5) < 1e-6 for r in rows)
    assert next(model.parameters()).dtype is dtype
    with torch.no_grad():
        assert torch.isfinite(model(samples[:1]).logits.float()).all()


def test_gemma2_blocks_get_their_own_masks():
    from sparsedeploy.prune.calibration import capture_block_inputs

    model = _model("gemma2").eval()
    samples = torch.randint(0, 128, (1, 32))
    _inputs, calls = capture_block_inputs(model, samples, torch.device("cpu"))
    assert len(calls) == len(find_blocks(model)) == 2
    m0, m1 = (c[1].get("attention_mask") for c in calls)
    assert m0 is not None and m1 is not None and not torch.equal(m0, m1)  # sliding vs global attention
