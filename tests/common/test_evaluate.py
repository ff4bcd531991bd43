import math

import pytest
import torch
import torch.nn.functional as F

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.evaluate import eval_windows, layer_sparsity, overall_sparsity, perplexity


def test_windows_non_overlapping_tail_dropped():
    tokens = torch.arange(103)
    w = eval_windows(tokens, 10)
    assert w.shape == (10, 10) and w[1, 0] == 10 and w[-1, -1] == 99
    assert eval_windows(tokens, 10, max_windows=3).shape == (3, 10)
    with pytest.raises(UserError, match="fewer than one window"):
        eval_windows(torch.arange(5), 10)


def test_perplexity_matches_brute_force(tiny_model):
    tokens = torch.randint(0, 256, (130,), generator=torch.Generator().manual_seed(0))
    result = perplexity(tiny_model, tokens, 32, torch.device("cpu"), show_progress=False)
    nll, n = 0.0, 0
    with torch.no_grad():
        for k in range(4):  # 130 // 32 windows, tail of 2 dropped
            ids = tokens[k * 32 : (k + 1) * 32]
            logits = tiny_model(ids[None]).logits[0]
            for t in range(31):
                nll -= float(F.log_softmax(logits[t], -1)[ids[t + 1]])
                n += 1
    assert result.windows == 4 and result.tokens == n == 124
    assert result.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_layer_sparsity_measured_from_weights(tiny_model):
    lin = tiny_model.model.layers[0].mlp.up_proj
    lin.weight.data[:, : lin.in_features // 2] = 0
    rows = layer_sparsity(tiny_model)
    row = next(r for r in rows if r["block"] == 0 and r["name"] == "mlp.up_proj")
    assert row["sparsity"] == 0.5 and row["zeros"] == lin.weight.numel() // 2
    assert 0 < overall_sparsity(rows) < 0.5
