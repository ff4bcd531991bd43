import json

import pytest
import torch
from safetensors.torch import load_file

from sparsedeploy.errors import UserError
from sparsedeploy.methods import build_method
from sparsedeploy.models import find_blocks, find_linears, load_model
from sparsedeploy.prune import PruneConfig, prune_model, run_prune
from sparsedeploy.sparsity import SparsitySpec, satisfies_nm


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{i % 150} The quick brown fox." for i in range(400)))
    return path


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_run_prune_writes_loadable_sparse_checkpoint(tiny_checkpoint, calib_file, tmp_path, method, sparsity):
    out = tmp_path / "out"
    config = PruneConfig(model=str(tiny_checkpoint), method=method, sparsity=sparsity, calib=f"text:{calib_file}",
                         nsamples=4, seqlen=32, device="cpu")
    report = run_prune(config, out, show_progress=False)
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=1e-6)
    saved = json.loads((out / "report.json").read_text())
    assert saved["method"] == method and saved["calibration"]["nsamples"] == 4 and saved["peak_rss_mib"] > 0
    assert len(saved["layers"]) == 14 and all(r["sparsity"] == pytest.approx(0.5) for r in saved["layers"])
    masks = load_file(str(out / "masks.safetensors"))
    reloaded = load_model(str(out)).model
    for i, block in enumerate(find_blocks(reloaded)):
        for name, lin in find_linears(block).items():
            mask = masks[f"model.layers.{i}.{name}"]
            assert torch.equal(lin.weight == 0, ~mask)  # zeros kept exactly through save/load
            if sparsity == "2:4":
                assert satisfies_nm(lin.weight, 2, 4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp leftovers


def test_existing_output_refused_without_overwrite(tiny_checkpoint, calib_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    config = PruneConfig(model=str(tiny_checkpoint), calib=f"text:{calib_file}", nsamples=2, seqlen=16, device="cpu")
    with pytest.raises(UserError, match="already exists"):
        run_prune(config, out, show_progress=False)
    run_prune(config, out, overwrite=True, show_progress=False)
    assert not (out / "keep.txt").exists() and (out / "report.json").exists()


def test_failure_midway_leaves_no_output(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    import sparsedeploy.prune as prune_mod

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prune_mod, "save_file", boom)
    out = tmp_path / "out"
    config = PruneConfig(model=str(tiny_checkpoint), calib=f"text:{calib_file}", nsamples=2, seqlen=16, device="cpu")
    with pytest.raises(UserError, match="nothing was written"):
        run_prune(config, out, show_progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_prune_model_per_layer_specs(tiny_model, tiny_samples):
    specs = {0: SparsitySpec.unstructured(0.25), 1: SparsitySpec.unstructured(0.75)}
    masks = prune_model(tiny_model, tiny_samples, build_method("wanda"), lambda i, n: specs[i], torch.device("cpu"), show_progress=False)
    assert len(masks) == 14
    for name, mask in masks.items():
        block = int(name.split(".")[2])
        assert float((~mask).float().mean()) == pytest.approx(specs[block].ratio)


def test_wanda_beats_magnitude_on_reconstruction(tiny_model, tiny_samples):
    """On the tiny model, Wanda's block outputs stay closer to dense than magnitude's (sanity, not a benchmark)."""
    import copy

    from sparsedeploy.engine import capture_block_inputs

    def final_hidden(model):
        with torch.no_grad():
            return torch.cat([model.model(s[None]).last_hidden_state for s in tiny_samples])

    dense = final_hidden(tiny_model)
    errs = {}
    for method in ("magnitude", "wanda"):
        m = copy.deepcopy(tiny_model)
        prune_model(m, tiny_samples, build_method(method), lambda i, n: SparsitySpec.unstructured(0.5), torch.device("cpu"), show_progress=False)
        errs[method] = float((final_hidden(m) - dense).pow(2).mean())
    assert errs["wanda"] < errs["magnitude"]
