"""Exporting a model with no zeros at all warns that it does not look pruned."""

import logging

from sparsedeploy.export.verification import warn_if_no_zeros


def test_dense_checkpoint_warns_and_pruned_does_not(tiny_checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sparsedeploy.export"):
        assert warn_if_no_zeros(tiny_checkpoint) == 0
    assert f"{tiny_checkpoint} has no zero weights at all: it does not look pruned" in caplog.text
    caplog.clear()
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name][0, :5] = 0
    save_file(weights, str(tiny_checkpoint / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="sparsedeploy.export"):
        assert warn_if_no_zeros(tiny_checkpoint) == 5
    assert "no zero weights" not in caplog.text
