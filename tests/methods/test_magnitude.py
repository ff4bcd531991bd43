import torch

from sparsedeploy.methods.magnitude import Magnitude
from sparsedeploy.sparsity import SparsitySpec


def test_magnitude_layer_threshold():
    w = torch.tensor([[0.1, -0.2, 3.0, 4.0], [5.0, 6.0, -0.3, 0.4]])
    result = Magnitude().prune(w, None, SparsitySpec.unstructured(0.5))
    assert result.mask.tolist() == [[False, False, True, True], [True, True, False, False]]
    assert float((result.weight == 0).float().mean()) == 0.5
    assert w[0, 0] == 0.1  # input untouched


def test_magnitude_nm():
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.6, -0.7, 0.1]])
    result = Magnitude().prune(w, None, SparsitySpec.nm(2, 4))
    assert result.mask.tolist() == [[False, True, True, False, False, True, True, False]]
