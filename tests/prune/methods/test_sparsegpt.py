import logging

import pytest
import torch

from sparsedeploy.common.sparsity import SparsitySpec, parse_sparsity, satisfies_nm
from sparsedeploy.prune.calibration import InputStats
from sparsedeploy.prune.methods import build_method
from sparsedeploy.prune.methods.magnitude import magnitude_mask
from sparsedeploy.prune.methods.sparsegpt import inverse_hessian_cholesky, sparsegpt
from sparsedeploy.prune.methods.wanda import wanda_mask


def correlated_layer(seed: int = 0, out: int = 48, inp: int = 64, tokens: int = 1024):
    """A random layer whose inputs are strongly correlated and non-centred (as in LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=gen) / inp**0.5
    x = torch.randn(tokens, inp, generator=gen) @ mix + 0.5 * torch.randn(inp, generator=gen)
    w = torch.randn(out, inp, generator=gen)
    stats = InputStats(inp, torch.device("cpu"), with_hessian=True)
    stats.update(x)
    return w, x, stats


def recon_error(w: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - new).T) ** 2).sum())


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4"])
def test_sparsegpt_beats_wanda_and_magnitude_on_reconstruction(sparsity):
    w, x, stats = correlated_layer()
    spec = parse_sparsity(sparsity)
    mask, new = sparsegpt(w, stats.hessian, spec)
    e_sgpt = recon_error(w, new, x)
    e_wanda = recon_error(w, w * wanda_mask(w, stats.sq_mean, spec), x)
    e_mag = recon_error(w, w * magnitude_mask(w, spec), x)
    assert e_sgpt < e_wanda and e_sgpt < e_mag
    assert torch.equal(new == 0, ~mask | (w == 0))
    if spec.is_nm:
        assert (mask.reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
        assert satisfies_nm(new, 2, 4)
    else:
        assert int((~mask).sum()) == int(w.numel() * spec.ratio)


def test_sparsegpt_does_not_modify_inputs():
    w, _x, stats = correlated_layer()
    w_copy, h_copy = w.clone(), stats.hessian.clone()
    sparsegpt(w, stats.hessian, SparsitySpec.unstructured(0.5))
    assert torch.equal(w, w_copy) and torch.equal(stats.hessian, h_copy)


def test_sparsegpt_dead_inputs_are_pruned_and_result_finite():
    w, x, _ = correlated_layer()
    x[:, :8] = 0.0  # eight input channels never fire
    stats = InputStats(x.shape[1], torch.device("cpu"), with_hessian=True)
    stats.update(x)
    mask, new = sparsegpt(w, stats.hessian, SparsitySpec.unstructured(0.6), blocksize=16)
    assert torch.isfinite(new).all()
    assert not mask[:, :8].any()  # a dead input's weight costs nothing to prune: pruned first


def test_sparsegpt_blocksize_smaller_than_layer_matches_one_block_closely():
    w, x, stats = correlated_layer()
    spec = SparsitySpec.nm(2, 4)  # N:M masks are chosen per group, so block size must not change the result
    m1, w1 = sparsegpt(w, stats.hessian, spec, blocksize=w.shape[1])
    m2, w2 = sparsegpt(w, stats.hessian, spec, blocksize=8)
    assert torch.equal(m1, m2)
    assert torch.allclose(w1, w2, rtol=1e-3, atol=1e-4)


def test_fixed_mask_reconstruction_keeps_mask_and_lowers_error():
    w, x, stats = correlated_layer()
    spec = SparsitySpec.unstructured(0.6)
    given = wanda_mask(w, stats.sq_mean, spec)
    mask, new = sparsegpt(w, stats.hessian, spec, mask=given)
    assert torch.equal(mask, given)
    assert recon_error(w, new, x) < recon_error(w, w * given, x)


def test_cholesky_failure_retries_with_more_damping_and_logs(caplog):
    H = torch.eye(6)
    H[2, 2] = -0.01  # not positive definite without damping
    with caplog.at_level(logging.WARNING, logger="sparsedeploy.prune.methods.sparsegpt"):
        U, damp = inverse_hessian_cholesky(H, percdamp=0.0)
    assert damp > 0.01 and torch.isfinite(U).all()
    assert "retrying" in caplog.text
    assert torch.allclose(U.T @ U, torch.linalg.inv(H + damp * torch.eye(6)), atol=1e-4)


def test_unusable_hessian_raises_instead_of_garbage():
    with pytest.raises(ValueError):
        inverse_hessian_cholesky(torch.full((4, 4), float("nan")), 0.01)


def test_sparsegpt_method_on_tiny_model_shares_hessian_and_is_exact(tiny_model, tiny_samples):
    from sparsedeploy.common.evaluate import layer_sparsity
    from sparsedeploy.common.models import find_blocks, find_linears
    from sparsedeploy.prune.blocks import prune_model

    method = build_method("sparsegpt", blocksize=32)
    assert method.needs_hessian
    seen = []  # the statistics object each linear is pruned with, in the engine's order
    prune_one = method.prune
    method.prune = lambda weight, stats, spec, **kw: (seen.append(stats), prune_one(weight, stats, spec, **kw))[1]
    masks = prune_model(
        tiny_model, tiny_samples, method, lambda _i, _n: SparsitySpec.nm(2, 4), torch.device("cpu"), show_progress=False
    )
    assert len(masks) == 14
    names = list(find_linears(find_blocks(tiny_model)[0]))
    for block in range(2):
        stats = dict(zip(names, seen[block * len(names) : (block + 1) * len(names)]))
        attn = stats["self_attn.q_proj"]
        mlp = stats["mlp.gate_proj"]
        # linears reading the same tensor share one Hessian, collected once over every calibration token
        assert stats["self_attn.k_proj"] is attn and stats["self_attn.v_proj"] is attn and stats["mlp.up_proj"] is mlp
        assert len({id(attn), id(stats["self_attn.o_proj"]), id(mlp), id(stats["mlp.down_proj"])}) == 4
        assert attn.count == mlp.count == tiny_samples.numel()
    for row in layer_sparsity(tiny_model):
        assert row["sparsity"] >= 0.5
    for mask in masks.values():
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CPU-vs-CUDA agreement not checked here")
@pytest.mark.parametrize("sparsity", ["0.6", "2:4"])
def test_cpu_and_cuda_agree(sparsity):
    w, x, stats = correlated_layer(seed=3, out=96, inp=256, tokens=2048)
    spec = parse_sparsity(sparsity)
    cpu_mask, cpu_new = sparsegpt(w, stats.hessian, spec)
    gpu_mask, gpu_new = sparsegpt(w.cuda(), stats.hessian.cuda(), spec)
    assert gpu_mask.is_cuda and gpu_new.is_cuda
    assert (gpu_mask.cpu() != cpu_mask).float().mean() < 0.01  # near-ties may fall either way after rounding
    if spec.is_nm:  # every row keeps exactly N of each M on both devices
        assert torch.equal(gpu_mask.sum(1).cpu(), cpu_mask.sum(1))
    else:  # both reach the requested fraction of zeros
        for mask in (gpu_mask.cpu(), cpu_mask):
            assert (~mask).float().mean().item() == pytest.approx(spec.ratio, abs=0.01)
    assert recon_error(w, gpu_new.cpu(), x) == pytest.approx(recon_error(w, cpu_new, x), rel=0.02)
