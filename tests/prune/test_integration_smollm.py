"""The foundation on the real model: smollm2-135m pruned 50% by Wanda and by magnitude, offline."""

import copy

import pytest
import torch

from sparsedeploy.common.data import calibration_samples, eval_tokens
from sparsedeploy.common.evaluate import layer_sparsity, overall_sparsity, perplexity
from sparsedeploy.common.sparsity import SparsitySpec
from sparsedeploy.prune.blocks import prune_model
from sparsedeploy.prune.methods import build_method

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


def test_wanda_far_below_magnitude_and_above_dense(smollm, wikitext_test):
    tokens = eval_tokens(smollm.tokenizer, f"wikitext2:{wikitext_test}")
    samples = calibration_samples(smollm.tokenizer, "gensim-wiki", nsamples=16, seqlen=256, seed=0)
    ppl = {"dense": perplexity(smollm.model, tokens, 256, CPU, max_windows=12, show_progress=False).ppl}
    for method in ("wanda", "magnitude"):
        model = copy.deepcopy(smollm.model)
        masks = prune_model(
            model, samples, build_method(method), lambda i, n: SparsitySpec.unstructured(0.5), CPU, show_progress=False
        )
        assert len(masks) == 30 * 7
        rows = layer_sparsity(model)
        assert overall_sparsity(rows) == pytest.approx(0.5, abs=1e-4)
        if method == "wanda":  # Wanda prunes exactly half of every output row
            assert all(abs(r["sparsity"] - 0.5) < 1e-3 for r in rows)
        ppl[method] = perplexity(model, tokens, 256, CPU, max_windows=12, show_progress=False).ppl
        del model
    print("perplexity", ppl)
    assert ppl["dense"] < ppl["wanda"] < ppl["magnitude"]
    assert ppl["wanda"] < 0.5 * ppl["magnitude"], ppl  # "far below"
    assert ppl["dense"] < 60  # the dense model is a working language model on WikiText-2
