"""DSnoT on the real model: its default mode (second-order, verified) is never worse than its Wanda start."""

import copy

import pytest
import torch

from sparsedeploy.data import calibration_samples, eval_tokens
from sparsedeploy.evaluate import perplexity
from sparsedeploy.methods import build_method
from sparsedeploy.prune import prune_model
from sparsedeploy.sparsity import parse_sparsity

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


def test_verified_dsnot_never_worse_than_wanda_init_and_better_somewhere(smollm, wikitext_test):
    tokens = eval_tokens(smollm.tokenizer, f"wikitext2:{wikitext_test}")
    samples = calibration_samples(smollm.tokenizer, "gensim-wiki", nsamples=8, seqlen=256, seed=0)
    check = calibration_samples(smollm.tokenizer, "gensim-wiki", nsamples=4, seqlen=256, seed=1)
    ratios = {}
    for sparsity in ("0.6", "0.7", "2:4"):
        spec = parse_sparsity(sparsity)
        ppl, masks = {}, {}
        for label, method in (("wanda", build_method("wanda")), ("dsnot", build_method("dsnot", init="wanda"))):
            model = copy.deepcopy(smollm.model)
            masks[label] = prune_model(model, samples, method, lambda _i, _n: spec, CPU, show_progress=False, check_samples=check)
            ppl[label] = perplexity(model, tokens, 256, CPU, max_windows=8, show_progress=False).ppl
            del model
        print(sparsity, ppl, method.summary)
        assert method.summary["refined"] == 30 * {"attn": 4, "mlp": 3, "all": 7}[method.targets]
        assert method.summary["swaps"] > 0
        for name, mask in masks["dsnot"].items():  # same count per row as Wanda
            assert torch.equal(mask.sum(1), masks["wanda"][name].sum(1)), name
        ratios[sparsity] = ppl["dsnot"] / ppl["wanda"]
    assert all(r <= 1.01 for r in ratios.values()), ratios  # never worse than its start (within 1%)
    assert min(ratios.values()) < 1.0, ratios  # and strictly better in at least one setting
