"""DSnoT on the real model: its default mode (second-order, verified) is never worse than its Wanda start."""

import copy

import pytest
import torch

from sparsedeploy.common.data import calibration_samples, eval_tokens
from sparsedeploy.common.evaluate import perplexity
from sparsedeploy.common.sparsity import parse_sparsity
from sparsedeploy.prune.blocks import prune_model
from sparsedeploy.prune.methods import build_method

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
            masks[label] = prune_model(
                model, samples, method, lambda _i, _n: spec, CPU, show_progress=False, check_samples=check
            )
            ppl[label] = perplexity(model, tokens, 256, CPU, max_windows=8, show_progress=False).ppl
            del model
        print(sparsity, ppl, method.summary)
        assert method.summary["refined"] == 30 * {"attn": 4, "mlp": 3, "all": 7}[method.targets]
        assert method.summary["swaps"] > 0
        for name, mask in masks["dsnot"].items():  # Wanda's count: per linear exactly, per row within one
            wanda = masks["wanda"][name]
            assert int(mask.sum()) == int(wanda.sum()), name
            per_row = mask.sum(1)
            assert int(per_row.max() - per_row.min()) <= 1, name
            if ".layers.0." in name:  # block 0 sees the same inputs in both runs: the very rows of its Wanda start
                assert torch.equal(per_row, wanda.sum(1)), name
        ratios[sparsity] = ppl["dsnot"] / ppl["wanda"]
    assert all(r <= 1.01 for r in ratios.values()), ratios  # never worse than its start (within 1%)
    assert min(ratios.values()) < 1.0, ratios  # and strictly better in at least one setting


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: DSnoT on CUDA not checked on the real model here"
)
def test_default_dsnot_on_cuda_is_as_good_as_on_cpu_on_the_real_model(smollm, wikitext_test):
    """CUDA and CPU run the same tensor code; rounding differs, and the real model amplifies it.

    Measured on an H100 (2026-11-22, this setting): Wanda 254.7 (CPU) vs 259.3 (CUDA), DSnoT 200.0 vs
    190.4. Each block's pruning feeds the next block's statistics, so a few near-ties that round the other
    way early on change later masks: the two results are two equally valid prunings, not one. What must
    hold on both devices: Wanda within a few percent, and DSnoT never worse than Wanda on its own device.
    """
    tokens = eval_tokens(smollm.tokenizer, f"wikitext2:{wikitext_test}")
    samples = calibration_samples(smollm.tokenizer, "gensim-wiki", nsamples=8, seqlen=256, seed=0)
    check = calibration_samples(smollm.tokenizer, "gensim-wiki", nsamples=4, seqlen=256, seed=1)
    spec = parse_sparsity("2:4")
    ppl, masks, times, summary = {}, {}, {}, {}
    for dev in ("cpu", "cuda"):
        for label, method in (("wanda", build_method("wanda")), ("dsnot", build_method("dsnot", init="wanda"))):
            model = copy.deepcopy(smollm.model)
            times[dev, label] = []
            masks[dev, label] = prune_model(
                model,
                samples,
                method,
                lambda _i, _n: spec,
                torch.device(dev),
                show_progress=False,
                check_samples=check,
                block_seconds=times[dev, label],
            )
            ppl[dev, label] = perplexity(model, tokens, 256, torch.device(dev), max_windows=8, show_progress=False).ppl
            summary[dev, label] = getattr(method, "summary", None)
            del model
    print("ppl", ppl, "\nseconds", {k: round(sum(t), 1) for k, t in times.items()}, "\nsummary", summary)
    assert all(len(t) == 30 for t in times.values())
    assert ppl["cuda", "wanda"] == pytest.approx(ppl["cpu", "wanda"], rel=0.03)
    for dev in ("cpu", "cuda"):
        assert ppl[dev, "dsnot"] <= 1.01 * ppl[dev, "wanda"], (dev, ppl)
        for name, mask in masks[dev, "dsnot"].items():  # N:M kept exactly on both devices
            assert torch.equal(
                mask.reshape(mask.shape[0], -1, 4).sum(-1), torch.full_like(mask[:, ::4], 2, dtype=torch.long)
            ), name
