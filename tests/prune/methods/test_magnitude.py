import torch

from sparsedeploy.common.sparsity import SparsitySpec
from sparsedeploy.prune.methods.magnitude import Magnitude


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


def test_magnitude_prune_linears_prunes_every_decoder_linear_in_place_and_nothing_else():
    from sparsedeploy.common.models import find_blocks, find_linears
    from sparsedeploy.prune.methods.magnitude import magnitude_prune_linears
    from tests.conftest import tiny_llama

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = SparsitySpec.unstructured(0.6)
    magnitude_prune_linears(model, spec)
    linears = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if any(module is lin for block in find_blocks(model) for lin in find_linears(block).values())
    }
    assert len(linears) == 2 * 7
    for key, value in model.state_dict().items():
        if key in linears:
            assert torch.equal(value, Magnitude().prune(before[key], None, spec).weight)
        else:
            assert torch.equal(value, before[key])  # embeddings, norms, lm_head untouched
