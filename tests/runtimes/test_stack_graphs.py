"""The decoder-stack graphs (prefill and decode step) compute what the model computes, and compile in DeepSparse."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _cache_tensors(cache, layers: int) -> list:
    """[key_0, value_0, key_1, ...] of a transformers DynamicCache."""
    return [t for i in range(layers) for t in cache[i][:2]]


def test_decoder_stack_matches_the_model_hidden_states(tiny_checkpoint, tmp_path):
    """The prefill form computes the model's last hidden states, and the keys/values its cache holds, from the
    embeddings (ORT vs PyTorch)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsedeploy.onnx.storage import session_from_path
    from sparsedeploy.runtimes.stack_graphs import export_decoder_stack

    batch, seq = 2, 8
    path = export_decoder_stack(tiny_checkpoint, tmp_path / "stack.onnx", batch, seq)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(seq)[None].expand(batch, seq))
        run = model.model(ids, use_cache=True)
    mask = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None].expand(batch, 1, seq, seq)
    sess = session_from_path(path, threads=1)
    assert [o.name for o in sess.get_outputs()] == ["out", "new_key_0", "new_value_0", "new_key_1", "new_value_1"]
    got = sess.run(
        None, {"hidden": hidden.numpy(), "cos": cos.numpy(), "sin": sin.numpy(), "mask": mask.contiguous().numpy()}
    )
    np.testing.assert_allclose(got[0], run.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    for g, expected in zip(got[1:], _cache_tensors(run.past_key_values, 2), strict=True):
        np.testing.assert_allclose(g, expected.numpy(), atol=1e-5, rtol=1e-4)


def test_decoder_stack_decode_step_matches_the_model_with_its_kv_cache(tiny_checkpoint, tmp_path):
    """The decode-step form: one new token per sequence attending to the cached prompt gives the hidden states
    and new cache rows that the model computes with its own DynamicCache."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsedeploy.onnx.storage import session_from_path
    from sparsedeploy.runtimes.stack_graphs import decoder_stack_names, export_decoder_stack

    batch, prompt = 2, 12
    path = export_decoder_stack(tiny_checkpoint, tmp_path / "step.onnx", batch, 1, past=prompt)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (batch, prompt + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = model.model(ids[:, :prompt], use_cache=True)
        past = [t.clone() for t in _cache_tensors(first.past_key_values, 2)]
        step = model.model(ids[:, prompt:], past_key_values=first.past_key_values, use_cache=True)
        hidden = model.model.embed_tokens(ids[:, prompt:])
        cos, sin = model.model.rotary_emb(hidden, torch.full((batch, 1), prompt))
    inputs, outputs = decoder_stack_names(2, prompt)
    feed = dict(
        zip(inputs, [t.numpy() for t in (hidden, cos, sin, torch.zeros(batch, 1, 1, prompt + 1), *past)], strict=True)
    )
    sess = session_from_path(path, threads=1)
    assert [i.name for i in sess.get_inputs()] == inputs and [o.name for o in sess.get_outputs()] == outputs
    got = sess.run(None, feed)
    np.testing.assert_allclose(got[0], step.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    for g, full in zip(got[1:], _cache_tensors(step.past_key_values, 2), strict=True):
        np.testing.assert_allclose(g, full[:, :, prompt:].numpy(), atol=1e-5, rtol=1e-4)  # the step's own row
    # the cache matters: attending to a different past changes the result
    feed["past_value_0"] = feed["past_value_0"] + 1.0
    assert np.abs(sess.run(None, feed)[0] - got[0]).max() > 1e-3


@pytest.mark.slow
def test_decoder_stack_compiles_in_deepsparse(tiny_checkpoint, tmp_path, deepsparse_env):
    from sparsedeploy.runtimes import deepsparse_env as ds
    from sparsedeploy.runtimes.stack_graphs import export_decoder_stack

    path = export_decoder_stack(tiny_checkpoint, tmp_path / "stack.onnx", 1, 16)
    info = ds.check_model(deepsparse_env, path, batch=1, threads=1)
    assert info["ok"] and info["outputs"] == [[1, 16, 64]] + [[1, 2, 16, 16]] * 4  # hidden, then K/V of 2 layers
    step = export_decoder_stack(tiny_checkpoint, tmp_path / "step.onnx", 2, 1, past=16)
    info = ds.check_model(deepsparse_env, step, batch=2, threads=1)
    assert info["ok"] and info["outputs"] == [[2, 1, 64]] + [[2, 2, 1, 16]] * 4
