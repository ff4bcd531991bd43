import pytest
import torch

from sparsedeploy.common.models import find_blocks, load_model
from sparsedeploy.prune.checkpoint import load_masks
from sparsedeploy.prune.driver import PruneConfig, run_prune


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{i % 150} The quick brown fox." for i in range(400)))
    return path


def _weights(folder):
    model = load_model(str(folder)).model
    return dict(model.state_dict())


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offload_gives_the_same_model(tiny_checkpoint, calib_file, tmp_path, offload):
    config = PruneConfig(
        model=str(tiny_checkpoint),
        method="wanda",
        sparsity="0.5",
        calib=f"text:{calib_file}",
        nsamples=3,
        seqlen=24,
        device="cpu",
    )
    run_prune(config, tmp_path / "ram", show_progress=False)
    report = run_prune(config, tmp_path / offload, show_progress=False, offload=offload)
    assert report["offload"] == offload and report["overall_sparsity"] == pytest.approx(0.5)
    a, b = _weights(tmp_path / "ram"), _weights(tmp_path / offload)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma = load_masks(tmp_path / "ram")
    mb = load_masks(tmp_path / offload)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    if offload == "disk":
        assert (tmp_path / "disk" / "model.safetensors.index.json").is_file()
        assert len(report["layers"]) == 14


def test_disk_offload_keeps_blocks_off_memory(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    """While block i is pruned, every other block's weights are on the meta device (not in RAM)."""
    import sparsedeploy.prune.driver as prune_mod

    seen = []
    real = prune_mod.prune_model

    def spy(model, *args, **kwargs):
        inner_release = kwargs["release_block"]

        def release(index, block):
            others = [b for j, b in enumerate(find_blocks(model)) if j != index]
            seen.append(all(p.is_meta for b in others for p in b.parameters()))
            inner_release(index, block)

        kwargs["release_block"] = release
        return real(model, *args, **kwargs)

    monkeypatch.setattr(prune_mod, "prune_model", spy)
    config = PruneConfig(model=str(tiny_checkpoint), calib=f"text:{calib_file}", nsamples=2, seqlen=16, device="cpu")
    run_prune(config, tmp_path / "d", show_progress=False, offload="disk")
    assert seen == [True, True]


def test_disk_offload_resume(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    import sparsedeploy.prune.checkpoint as ckpt_mod

    config = PruneConfig(
        model=str(tiny_checkpoint), sparsity="0.6", calib=f"text:{calib_file}", nsamples=3, seqlen=24, device="cpu"
    )
    run_prune(config, tmp_path / "straight", show_progress=False)
    real = ckpt_mod.BlockCheckpoint.save_block

    def die(self, index, block, masks):
        real(self, index, block, masks)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.BlockCheckpoint, "save_block", die)
    with pytest.raises(KeyboardInterrupt):
        run_prune(config, tmp_path / "d", show_progress=False, offload="disk")
    monkeypatch.undo()
    report = run_prune(config, tmp_path / "d", show_progress=False, offload="disk", resume=True)
    assert report["resumed_from_block"] == 1
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "d")
    assert all(torch.equal(a[k], b[k]) for k in a)
