import json
import math
import random

import pytest
import torch

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.models import find_blocks, find_linears
from sparsedeploy.common.sparsity import SparsitySpec, parse_sparsity
from sparsedeploy.prune.allocation import (
    Allocation,
    AllocationConfig,
    atp_candidates,
    atp_max_difference,
    atp_ratios,
    fit_around_target,
    outlier_ratio,
    owl_outlier_ratios,
    owl_ratios,
    plan_allocation,
    remember_allocation,
    restore_allocation,
    weighted_mean,
)
from sparsedeploy.prune.blocks import prune_model
from sparsedeploy.prune.driver import PruneConfig, run_prune
from sparsedeploy.prune.methods import build_method
from tests.conftest import tiny_llama

CPU = torch.device("cpu")


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{i % 150} The quick brown fox." for i in range(400)))
    return path


def _random_case(seed: int):
    rng = random.Random(seed)
    n = rng.randint(3, 40)
    outliers = [rng.random() * rng.choice([0.01, 0.1, 1.0]) for _ in range(n)]
    weights = [rng.choice([100, 300, 1000]) for _ in range(n)]
    return outliers, weights


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.7, 0.08), (0.6, 0.2), (0.95, 0.08), (0.02, 0.08)])
def test_owl_mean_exact_bound_and_order(seed, target, lam):
    outliers, weights = _random_case(seed)
    ratios = owl_ratios(outliers, weights, target, lam)
    assert weighted_mean(ratios, weights) == pytest.approx(target, abs=1e-12)
    assert all(abs(r - target) <= lam + 1e-12 for r in ratios)
    assert all(0.0 <= r <= 0.99 for r in ratios)
    # more outliers -> lower (never higher) sparsity, strictly when the outlier ratios differ
    for i in range(len(ratios)):
        for j in range(len(ratios)):
            if outliers[i] > outliers[j]:
                assert ratios[i] < ratios[j]


def test_owl_skewed_outliers_still_within_lambda():
    # one block with many outliers: min-max then re-centring would push that block ~2 lambda below the target
    outliers = [0.001] * 9 + [0.05]
    ratios = owl_ratios(outliers, [1] * 10, 0.7, 0.08)
    assert min(ratios) == pytest.approx(0.7 - 0.08)  # the full lambda is used on the outlier side
    assert max(ratios) - 0.7 > 0 and weighted_mean(ratios, [1] * 10) == pytest.approx(0.7, abs=1e-12)


def test_owl_equal_outliers_is_uniform():
    assert owl_ratios([0.01] * 5, [1] * 5, 0.6, 0.08) == pytest.approx([0.6] * 5)


@pytest.mark.parametrize("target", [0.3, 0.6, 0.7, 0.9])
@pytest.mark.parametrize("weights", [[1] * 30, [5, 1, 3, 2, 7, 1, 1, 4]])
def test_atp_increasing_mean_preserving_and_clipped(target, weights):
    n = len(weights)
    for d in (0.001, 0.005, 0.02, 1.0):
        ratios = atp_ratios(n, weights, target, d)
        assert weighted_mean(ratios, weights) == pytest.approx(target, abs=1e-12)
        assert all(b > a for a, b in zip(ratios, ratios[1:]))
        assert all(0.0 <= r <= 0.99 + 1e-12 for r in ratios)
        steps = [b - a for a, b in zip(ratios, ratios[1:])]
        assert max(steps) - min(steps) < 1e-9  # an arithmetic progression
    dmax = atp_max_difference(n, weights, target)
    extreme = atp_ratios(n, weights, target, 10.0)
    assert extreme[0] == pytest.approx(0.0, abs=1e-9) or extreme[-1] == pytest.approx(0.99, abs=1e-9)
    assert extreme[1] - extreme[0] == pytest.approx(dmax)
    cands = atp_candidates(n, weights, target, (0.05, 0.1, 0.2, 5.0))
    assert all(0 < c <= dmax + 1e-15 for c in cands) and len(set(cands)) == len(cands)


def test_fit_around_target_shrinks_instead_of_clamping():
    ratios = fit_around_target([1.0, -1.0, 0.0], [1, 1, 2], 0.95, max_sparsity=0.99)
    assert max(ratios) <= 0.99 and weighted_mean(ratios, [1, 1, 2]) == pytest.approx(0.95, abs=1e-12)


def test_outlier_ratio_counts_above_m_times_mean():
    scores = [torch.ones(10), torch.tensor([100.0, 1.0])]  # mean = 111 / 12 = 9.25
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 12)  # only 100 > 46.25
    assert outlier_ratio(scores, 20.0) == 0.0


def test_owl_statistics_pass_leaves_model_untouched_and_sees_outliers(tiny_samples):
    model = tiny_llama(layers=3)
    with torch.no_grad():  # plant large weights in block 1: more outliers there
        for lin in find_linears(find_blocks(model)[1]).values():
            lin.weight[:, :3] *= 60.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outliers = owl_outlier_ratios(model, tiny_samples, CPU, m=5.0, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(outliers) == 3 and outliers[1] > max(outliers[0], outliers[2])
    alloc = plan_allocation(
        model,
        tiny_samples,
        build_method("wanda"),
        SparsitySpec.unstructured(0.6),
        AllocationConfig("owl"),
        CPU,
        show_progress=False,
    )
    assert alloc.ratios[1] == min(alloc.ratios) and alloc.ratios[1] < 0.6
    assert alloc.allocated_mean == pytest.approx(0.6, abs=1e-12)


@pytest.mark.parametrize("kind", ["owl", "atp"])
def test_nm_refused_for_non_uniform(kind, tiny_samples):
    with pytest.raises(UserError, match="N:M"):
        plan_allocation(
            tiny_llama(),
            tiny_samples,
            build_method("wanda"),
            parse_sparsity("2:4"),
            AllocationConfig(kind),
            CPU,
            lambda n: tiny_samples[:n],
            show_progress=False,
        )


def test_cli_nm_with_owl_is_one_line_error(tiny_checkpoint, calib_file, tmp_path):
    from sparsedeploy.cli import main

    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "prune",
                "--model",
                str(tiny_checkpoint),
                "--sparsity",
                "2:4",
                "--allocation",
                "owl",
                "--calib",
                f"text:{calib_file}",
                "--nsamples",
                "2",
                "--seqlen",
                "16",
                "--device",
                "cpu",
                "--output",
                str(out),
            ]
        )
    assert exc.value.code == 2 and not out.exists()


def _expected_zeros(model, ratios):
    total = 0
    for i, block in enumerate(find_blocks(model)):
        for lin in find_linears(block).values():
            rows, cols = lin.weight.shape
            total += round(rows * cols * ratios[i])
    return total


@pytest.mark.parametrize("kind", ["owl", "atp"])
@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt", "dsnot"])
def test_run_prune_with_allocation_hits_target(tiny_checkpoint, calib_file, tmp_path, kind, method):
    out = tmp_path / "out"
    config = PruneConfig(
        model=str(tiny_checkpoint),
        method=method,
        sparsity="0.6",
        calib=f"text:{calib_file}",
        nsamples=4,
        seqlen=32,
        device="cpu",
        allocation=kind,
        owl_lambda=0.1,
        method_options={"init": "wanda"} if method == "dsnot" else {},
    )
    report = run_prune(config, out, show_progress=False)
    alloc = report["allocation"]
    assert alloc["kind"] == kind and alloc["allocated_mean"] == pytest.approx(0.6, abs=1e-12)
    assert max(alloc["per_block"]) > min(alloc["per_block"])  # actually non-uniform
    if kind == "owl":
        assert max(abs(r - 0.6) for r in alloc["per_block"]) <= 0.1 + 1e-12
    else:
        assert alloc["per_block"] == sorted(alloc["per_block"]) and len(alloc["atp_search"]) >= 2
    layers = report["layers"]
    zeros = sum(r["zeros"] for r in layers)
    numel = sum(r["numel"] for r in layers)
    from sparsedeploy.common.models import load_model

    reloaded = load_model(str(out)).model
    if method in (
        "wanda",
        "dsnot",
    ):  # each linear prunes round(ratio x numel): the only gap to the target (DSnoT keeps Wanda's counts)
        assert zeros == _expected_zeros(reloaded, alloc["per_block"])
    assert abs(zeros / numel - 0.6) < 1e-3
    for r in layers:  # each block got its own ratio
        assert r["sparsity"] == pytest.approx(alloc["per_block"][r["block"]], abs=1.0 / r["shape"][1] + 1e-9)
    saved = json.loads((out / "report.json").read_text())
    assert saved["config"]["allocation"] == kind


def test_prune_model_accepts_allocation_spec_for(tiny_samples):
    model = tiny_llama(layers=4)
    alloc = plan_allocation(
        model,
        tiny_samples,
        build_method("wanda"),
        SparsitySpec.unstructured(0.5),
        AllocationConfig("atp"),
        CPU,
        lambda n: tiny_samples[:n],
        show_progress=False,
    )
    prune_model(model, tiny_samples, build_method("wanda"), alloc.spec_for, CPU, show_progress=False)
    per_block = [
        sum(int((lin.weight == 0).sum()) for lin in find_linears(b).values())
        / sum(lin.weight.numel() for lin in find_linears(b).values())
        for b in find_blocks(model)
    ]
    assert all(b > a for a, b in zip(per_block, per_block[1:]))
    assert not math.isnan(alloc.details["atp_difference"])


@pytest.mark.slow
def test_owl_on_the_real_model_hits_the_target_exactly(smollm):
    """smollm2-135m at 70% with OWL: per-block ratios within lambda, weighted mean exactly the target, zeros as
    allocated."""
    import copy

    from sparsedeploy.common.data import calibration_samples
    from sparsedeploy.common.evaluate import layer_sparsity
    from sparsedeploy.common.sparsity import parse_sparsity
    from sparsedeploy.prune.allocation import plan_allocation

    model = copy.deepcopy(smollm.model)
    calib = calibration_samples(smollm.tokenizer, "gensim-wiki", nsamples=4, seqlen=256, seed=0)
    spec = parse_sparsity("0.7")
    method = build_method("wanda")
    alloc = plan_allocation(
        model, calib, method, spec, AllocationConfig("owl"), torch.device("cpu"), show_progress=False
    )
    report = alloc.report()
    assert len(report["per_block"]) == 30 and report["allocated_mean"] == pytest.approx(0.7, abs=1e-12)
    assert max(abs(r - 0.7) for r in report["per_block"]) <= 0.08 + 1e-12 and max(report["per_block"]) > min(
        report["per_block"]
    )
    prune_model(model, calib, method, alloc.spec_for, torch.device("cpu"), show_progress=False)
    layers = layer_sparsity(model)
    assert sum(r["zeros"] for r in layers) == _expected_zeros(model, report["per_block"])
    assert (
        abs(sum(r["zeros"] for r in layers) / sum(r["numel"] for r in layers) - 0.7) < 1e-6
    )  # exact to the weight per linear


def test_atp_search_of_a_refining_method_prunes_with_its_initial_method(tiny_model, tiny_samples, monkeypatch):
    import sparsedeploy.prune.blocks as prune_mod
    from sparsedeploy.prune.allocation import atp_search

    used = []
    real = prune_mod.prune_model
    monkeypatch.setattr(
        prune_mod,
        "prune_model",
        lambda model, samples, method, *a, **k: used.append(method.name) or real(model, samples, method, *a, **k),
    )
    method = build_method("dsnot", init="sparsegpt")
    weights = [sum(lin.weight.numel() for lin in find_linears(b).values()) for b in find_blocks(tiny_model)]
    before = [lin.weight.clone() for b in find_blocks(tiny_model) for lin in find_linears(b).values()]
    best, trials = atp_search(
        tiny_model, tiny_samples, method, 0.6, weights, AllocationConfig("atp"), torch.device("cpu"), tiny_samples[:2]
    )
    assert len(trials) >= 2 and set(used) == {method.initial_method().name}
    after = [lin.weight for b in find_blocks(tiny_model) for lin in find_linears(b).values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the search leaves the model as it was


def test_a_remembered_allocation_is_restored_only_for_the_same_settings(tmp_path):
    spec = parse_sparsity("0.5")
    config = AllocationConfig("owl", owl_m=5.0, owl_lambda=0.08)
    planned = Allocation("owl", spec, [0.45, 0.55], [10, 10], {"owl_m": 5.0})
    assert restore_allocation(tmp_path, spec, config) is None  # nothing kept yet
    remember_allocation(tmp_path, spec, config, planned)
    restored = restore_allocation(tmp_path, spec, config)
    assert restored is not None and restored.ratios == [0.45, 0.55] and restored.weights == [10, 10]
    assert restored.details == {"owl_m": 5.0, "restored": True}
    assert restore_allocation(tmp_path, spec, AllocationConfig("owl", owl_m=3.0, owl_lambda=0.08)) is None
    assert restore_allocation(tmp_path, parse_sparsity("0.6"), config) is None
    assert restore_allocation(None, spec, config) is None


def test_uniform_or_workless_allocation_is_not_written(tmp_path):
    spec = parse_sparsity("0.5")
    remember_allocation(tmp_path, spec, AllocationConfig("uniform"), Allocation("uniform", spec, [0.5], [10]))
    assert not (tmp_path / "allocation.json").exists()
    remember_allocation(None, spec, AllocationConfig("owl"), Allocation("owl", spec, [0.5], [10]))
    assert list(tmp_path.iterdir()) == []
