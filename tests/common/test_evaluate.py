import math

import pytest
import torch
import torch.nn.functional as F

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.evaluate import (
    eval_windows,
    layer_sparsity,
    overall_sparsity,
    perplexity,
    window_perplexity,
)


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


def test_bos_windows_are_bos_then_text_and_seqlen_long():
    """Gemma protocol: the stream's own leading BOS is dropped, each window is BOS + 9 text tokens (10 long), and
    the text continues from window to window with nothing skipped or repeated."""
    tokens = torch.cat([torch.tensor([1]), torch.arange(10, 60)])  # BOS + 50 text tokens
    w = eval_windows(tokens, 10, bos=1)
    assert w.shape == (5, 10) and w[:, 0].tolist() == [1] * 5
    assert w[:, 1:].reshape(-1).tolist() == list(range(10, 55))  # 50 // 9 = 5 windows, tail of 5 dropped
    assert eval_windows(tokens, 10, max_windows=2, bos=1).shape == (2, 10)
    assert torch.equal(eval_windows(tokens, 10), tokens[:50].reshape(5, 10))  # no BOS: the plain windows
    with pytest.raises(UserError, match="fewer than one window"):
        eval_windows(torch.tensor([1, 2, 3]), 10, bos=1)


def test_perplexity_with_bos_matches_brute_force(tiny_model):
    """Every window scored as BOS + text: seqlen - 1 predicted tokens per window, the first one predicted from BOS."""
    tokens = torch.randint(3, 256, (130,), generator=torch.Generator().manual_seed(0))
    result = perplexity(tiny_model, tokens, 32, torch.device("cpu"), show_progress=False, bos=1)
    nll, n = 0.0, 0
    with torch.no_grad():
        for k in range(4):  # 130 // 31 windows
            ids = torch.cat([torch.tensor([1]), tokens[k * 31 : (k + 1) * 31]])
            logits = tiny_model(ids[None]).logits[0]
            for t in range(31):
                nll -= float(F.log_softmax(logits[t], -1)[ids[t + 1]])
                n += 1
    assert result.windows == 4 and result.seqlen == 32 and result.tokens == n == 4 * 31 and result.bos_per_window
    assert result.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    plain = perplexity(tiny_model, tokens, 32, torch.device("cpu"), show_progress=False)
    assert not plain.bos_per_window and plain.ppl != pytest.approx(result.ppl, rel=1e-3)


def test_window_perplexity_scores_ready_windows_as_given(tiny_model):
    """Calibration samples (already BOS-led for Gemma) are scored as they are, not re-cut."""
    windows = torch.randint(3, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    windows[:, 0] = 1
    a = window_perplexity(tiny_model, windows, torch.device("cpu"), show_progress=False)
    b = perplexity(tiny_model, windows.reshape(-1), 16, torch.device("cpu"), show_progress=False)
    assert a.windows == 3 and a.tokens == 3 * 15 and a.ppl == pytest.approx(b.ppl, rel=1e-6)


def test_layer_sparsity_measured_from_weights(tiny_model):
    lin = tiny_model.model.layers[0].mlp.up_proj
    lin.weight.data[:, : lin.in_features // 2] = 0
    rows = layer_sparsity(tiny_model)
    row = next(r for r in rows if r["block"] == 0 and r["name"] == "mlp.up_proj")
    assert row["sparsity"] == 0.5 and row["zeros"] == lin.weight.numel() // 2
    assert 0 < overall_sparsity(rows) < 0.5
