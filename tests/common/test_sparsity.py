import numpy as np
import pytest
import torch

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.sparsity import (
    SparsitySpec,
    mask_lowest_global,
    mask_lowest_per_row,
    nm_violations,
    parse_sparsity,
    satisfies_nm,
    sparsity_of,
)


@pytest.mark.parametrize(
    "text,ratio,nm",
    [
        ("0.5", 0.5, None),
        ("50%", 0.5, None),
        (0.7, 0.7, None),
        ("2:4", 0.5, (2, 4)),
        ("4:8", 0.5, (4, 8)),
        (" 1:4 ", 0.75, (1, 4)),
        ("0", 0.0, None),
    ],
)
def test_parse_sparsity(text, ratio, nm):
    spec = parse_sparsity(text)
    assert spec.ratio == pytest.approx(ratio)
    assert (spec.n, spec.m) == (nm if nm else (None, None))


@pytest.mark.parametrize("bad", ["1.0", "1", "-0.1", "150%", "abc", "4:4", "0:4", "5:4", "2:", ":4", "2:4:8"])
def test_parse_sparsity_rejects(bad):
    with pytest.raises(UserError) as err:
        parse_sparsity(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.33, 0.5, 0.6, 0.7, 0.9])
def test_per_row_exact_count(ratio):
    scores = torch.rand(13, 40, generator=torch.Generator().manual_seed(0))
    mask = mask_lowest_per_row(scores, SparsitySpec.unstructured(ratio))
    total = round(13 * 40 * ratio)
    assert int((~mask).sum()) == total  # the layer's sparsity is the ratio, to the nearest weight
    per_row = (~mask).sum(1)
    assert set(per_row.tolist()) <= {total // 13, total // 13 + 1}  # spread as evenly as the count allows
    if total % 13:  # rows pruning one more are those whose next weight scores lowest
        sorted_scores = scores.sort(dim=1).values
        nxt = sorted_scores[:, total // 13]
        extra = per_row > total // 13
        assert nxt[extra].max() <= nxt[~extra].min()
    # every pruned score is <= every kept score in its row
    for r in range(13):
        if (~mask[r]).any():
            assert scores[r][~mask[r]].max() <= scores[r][mask[r]].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_exact(n, m):
    scores = torch.rand(7, 32, generator=torch.Generator().manual_seed(1))
    mask = mask_lowest_per_row(scores, SparsitySpec.nm(n, m))
    groups = mask.reshape(7, 32 // m, m)
    assert (groups.sum(-1) == n).all()  # exactly M-N zeros per group
    w = torch.randn(7, 32) * mask
    assert satisfies_nm(w, n, m)
    assert not satisfies_nm(torch.ones(7, 32), n, m)


def test_ties_are_broken_stably():
    scores = torch.ones(2, 8)
    mask = mask_lowest_per_row(scores, SparsitySpec.unstructured(0.5))
    assert mask.tolist() == [[False] * 4 + [True] * 4] * 2


def test_global_threshold_exact_count_and_order():
    scores = torch.rand(10, 20, generator=torch.Generator().manual_seed(2))
    mask = mask_lowest_global(scores, SparsitySpec.unstructured(0.6))
    assert int((~mask).sum()) == 120
    assert scores[~mask].max() <= scores[mask].min()
    # rows are not forced to equal counts under a global threshold
    assert len(set((~mask).sum(1).tolist())) > 1


def test_nm_needs_multiple_of_m():
    with pytest.raises(UserError, match="multiple of M=4"):
        mask_lowest_per_row(torch.rand(3, 6), SparsitySpec.nm(2, 4))


def test_sparsity_of():
    assert sparsity_of(torch.tensor([0.0, 1.0, 0.0, 2.0])) == 0.5


def test_nm_violations_counts_groups_along_k():
    good = np.array([[1, 0], [0, 2], [3, 0], [0, 4]], np.float32)  # K=4, N=2: each column has 2 non-zeros in its group
    assert nm_violations(good, 2, 4)[0]
    bad = good.copy()
    bad[1, 0] = 5.0  # column 0 now has 3 non-zeros in one group of 4
    ok, reason = nm_violations(bad, 2, 4)
    assert not ok and "1 of 2 groups" in reason
    assert not nm_violations(np.ones((6, 2), np.float32), 2, 4)[0]  # K not a multiple of M
    assert "K=6" in nm_violations(np.ones((6, 2), np.float32), 2, 4)[1]


def test_nm_violations_reads_torch_tensors_along_any_axis():
    import torch

    w = torch.tensor([[1.0, 0, 0, 2, 0, 3, 0, 0]], dtype=torch.bfloat16)  # [out, in]: groups of 4 along in (K)
    assert nm_violations(w, 2, 4, axis=-1)[0] and not nm_violations(w, 1, 4, axis=-1)[0]
    assert nm_violations(w.T.float().numpy(), 2, 4, axis=0)[0]  # the same weight as ONNX's [K, N]
