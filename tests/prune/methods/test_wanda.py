import torch

from sparsedeploy.common.sparsity import SparsitySpec
from sparsedeploy.prune.calibration import InputStats
from sparsedeploy.prune.methods import build_method
from sparsedeploy.prune.methods.wanda import wanda_scores


def _stats(x: torch.Tensor) -> InputStats:
    s = InputStats(x.shape[-1], torch.device("cpu"))
    s.update(x)
    return s


def test_wanda_scores_match_brute_force():
    w = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.1, 4.0]])
    x = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, -2.0], [0.0, 2.0, 0.0]])  # tokens x in
    stats = _stats(x)
    brute = torch.zeros_like(w)
    for i in range(2):
        for j in range(3):
            brute[i, j] = abs(w[i, j]) * torch.sqrt(sum(x[t, j] ** 2 for t in range(3)) / 3)
    assert torch.allclose(wanda_scores(w, stats.sq_mean), brute)


def test_wanda_prunes_lowest_score_per_row_not_lowest_weight():
    # column 0 has large weights but a silent input; column 2 small weights but loud input
    w = torch.tensor([[5.0, 1.0, 0.5, 2.0]])
    x = torch.tensor([[0.01, 1.0, 100.0, 1.0]])
    result = build_method("wanda").prune(w, _stats(x), SparsitySpec.unstructured(0.25))
    assert result.mask.tolist() == [[False, True, True, True]]
    assert result.weight.tolist() == [[0.0, 1.0, 0.5, 2.0]]
    magnitude = build_method("magnitude").prune(w, None, SparsitySpec.unstructured(0.25))
    assert magnitude.mask.tolist() == [[True, True, False, True]]


def test_wanda_nm_groups():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen)
    result = build_method("wanda").prune(w, _stats(torch.randn(64, 32, generator=gen)), SparsitySpec.nm(2, 4))
    assert (result.mask.reshape(16, 8, 4).sum(-1) == 2).all()
    assert torch.equal(result.weight == 0, ~result.mask)
