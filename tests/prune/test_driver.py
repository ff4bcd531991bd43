import json

import pytest
import torch
from safetensors.torch import load_file

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.models import find_blocks, find_linears, load_model
from sparsedeploy.common.sparsity import SparsitySpec, satisfies_nm
from sparsedeploy.prune.blocks import prune_model
from sparsedeploy.prune.driver import PruneConfig, run_prune
from sparsedeploy.prune.methods import build_method


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{i % 150} The quick brown fox." for i in range(400)))
    return path


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_run_prune_writes_loadable_sparse_checkpoint(tiny_checkpoint, calib_file, tmp_path, method, sparsity):
    out = tmp_path / "out"
    config = PruneConfig(
        model=str(tiny_checkpoint),
        method=method,
        sparsity=sparsity,
        calib=f"text:{calib_file}",
        nsamples=4,
        seqlen=32,
        device="cpu",
    )
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
    with pytest.raises(UserError, match="not written by sparsedeploy"):  # --overwrite replaces only its own outputs
        run_prune(config, out, overwrite=True, show_progress=False)
    assert (out / "keep.txt").read_text() == "x"
    mine = tmp_path / "mine"
    run_prune(config, mine, show_progress=False)
    (mine / "stale.txt").write_text("x")
    run_prune(config, mine, overwrite=True, show_progress=False)
    assert not (mine / "stale.txt").exists() and (mine / "report.json").exists()


def test_failure_midway_leaves_no_output(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    import sparsedeploy.prune.driver as prune_mod

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prune_mod, "save_file", boom)
    out = tmp_path / "out"
    config = PruneConfig(model=str(tiny_checkpoint), calib=f"text:{calib_file}", nsamples=2, seqlen=16, device="cpu")
    with pytest.raises(UserError, match="nothing was written"):
        run_prune(config, out, show_progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    assert (tmp_path / ".out.partial" / "state.json").is_file()  # the per-block checkpoint stays, for --resume


def test_prune_model_per_layer_specs(tiny_model, tiny_samples):
    specs = {0: SparsitySpec.unstructured(0.25), 1: SparsitySpec.unstructured(0.75)}
    masks = prune_model(
        tiny_model, tiny_samples, build_method("wanda"), lambda i, n: specs[i], torch.device("cpu"), show_progress=False
    )
    assert len(masks) == 14
    for name, mask in masks.items():
        block = int(name.split(".")[2])
        assert float((~mask).float().mean()) == pytest.approx(specs[block].ratio)


def test_block_seconds_are_recorded_per_block(tiny_model, tiny_samples):
    times: list[float] = []
    prune_model(
        tiny_model,
        tiny_samples,
        build_method("wanda"),
        lambda i, n: SparsitySpec.unstructured(0.5),
        torch.device("cpu"),
        show_progress=False,
        block_seconds=times,
    )
    assert len(times) == 2 and all(t > 0 for t in times)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: pruning on CUDA not checked here")
@pytest.mark.parametrize(
    "method,options",
    [("wanda", {}), ("sparsegpt", {}), ("dsnot", {"init": "wanda"}), ("dsnot", {"init": "sparsegpt", "mode": "paper"})],
)
def test_prune_on_cuda_matches_cpu(tiny_model, tiny_samples, method, options):
    """The engine and every method run on CUDA: same masks as on the CPU up to near-ties, model back on the CPU."""
    import copy

    spec = SparsitySpec.unstructured(0.5)
    results = {}
    for dev in ("cpu", "cuda"):
        model = copy.deepcopy(tiny_model)
        masks = prune_model(
            model,
            tiny_samples,
            build_method(method, **options),
            lambda i, n: spec,
            torch.device(dev),
            show_progress=False,
        )
        assert all(p.device.type == "cpu" for p in model.parameters())
        results[dev] = (model, masks)
    (cpu_model, cpu_masks), (gpu_model, gpu_masks) = results["cpu"], results["cuda"]
    assert cpu_masks.keys() == gpu_masks.keys()
    differ = sum(int((cpu_masks[n] != gpu_masks[n]).sum()) for n in cpu_masks)
    total = sum(m.numel() for m in cpu_masks.values())
    assert differ / total < 0.01, (differ, total)
    with torch.no_grad():
        a, b = cpu_model(tiny_samples).logits, gpu_model(tiny_samples).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_wanda_beats_magnitude_on_reconstruction(tiny_model, tiny_samples):
    """On the tiny model, Wanda's block outputs stay closer to dense than magnitude's (sanity, not a benchmark)."""
    import copy

    def final_hidden(model):
        with torch.no_grad():
            return torch.cat([model.model(s[None]).last_hidden_state for s in tiny_samples])

    dense = final_hidden(tiny_model)
    errs = {}
    for method in ("magnitude", "wanda"):
        m = copy.deepcopy(tiny_model)
        prune_model(
            m,
            tiny_samples,
            build_method(method),
            lambda i, n: SparsitySpec.unstructured(0.5),
            torch.device("cpu"),
            show_progress=False,
        )
        errs[method] = float((final_hidden(m) - dense).pow(2).mean())
    assert errs["wanda"] < errs["magnitude"]


def test_resume_after_interruption_gives_identical_model(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    import sparsedeploy.prune.checkpoint as ckpt_mod

    config = PruneConfig(
        model=str(tiny_checkpoint),
        method="wanda",
        sparsity="0.6",
        calib=f"text:{calib_file}",
        nsamples=3,
        seqlen=24,
        device="cpu",
    )
    run_prune(config, tmp_path / "straight", show_progress=False)

    real_save = ckpt_mod.BlockCheckpoint.save_block

    def die_after_first(self, index, block, masks):
        real_save(self, index, block, masks)
        if index == 0:
            raise KeyboardInterrupt  # the run is interrupted right after block 0 was checkpointed

    monkeypatch.setattr(ckpt_mod.BlockCheckpoint, "save_block", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_prune(config, tmp_path / "resumed", show_progress=False)
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(ckpt_mod.BlockCheckpoint, "save_block", real_save)
    with pytest.raises(UserError, match="--resume"):
        run_prune(config, tmp_path / "resumed", show_progress=False)
    report = run_prune(config, tmp_path / "resumed", resume=True, show_progress=False)
    assert report["resumed_from_block"] == 1
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = load_file(str(tmp_path / "straight" / "masks.safetensors"))
    mb = load_file(str(tmp_path / "resumed" / "masks.safetensors"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert not (tmp_path / ".resumed.partial").exists()


def test_resume_refuses_changed_settings(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    import sparsedeploy.prune.checkpoint as ckpt_mod

    config = PruneConfig(
        model=str(tiny_checkpoint), sparsity="0.6", calib=f"text:{calib_file}", nsamples=2, seqlen=16, device="cpu"
    )
    monkeypatch.setattr(ckpt_mod.BlockCheckpoint, "save_block", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_prune(config, tmp_path / "o", show_progress=False)
    monkeypatch.undo()
    config.sparsity = "0.7"
    with pytest.raises(UserError, match="different settings.*sparsity"):
        run_prune(config, tmp_path / "o", resume=True, show_progress=False)


def test_sigkill_midway_then_resume_matches(tiny_checkpoint, calib_file, tmp_path):
    """A real SIGKILL (no cleanup runs) right after block 0 is checkpointed; --resume finishes identically."""
    import subprocess
    import sys

    args = [
        "-q",
        "prune",
        "--model",
        str(tiny_checkpoint),
        "--sparsity",
        "0.5",
        "--calib",
        f"text:{calib_file}",
        "--nsamples",
        "3",
        "--seqlen",
        "24",
        "--device",
        "cpu",
    ]
    killer = (
        "import os, signal, sys\n"
        "import sparsedeploy.prune.checkpoint as c\n"
        "real = c.BlockCheckpoint.save_block\n"
        "def save(self, i, b, m):\n"
        "    real(self, i, b, m)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.BlockCheckpoint.save_block = save\n"
        "from sparsedeploy.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", killer, *args, "--output", str(tmp_path / "k")], capture_output=True, text=True
    )
    assert proc.returncode == -9
    assert not (tmp_path / "k").exists() and (tmp_path / ".k.partial" / "block-0000.safetensors").is_file()
    from sparsedeploy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args + ["--output", str(tmp_path / "k")])
    assert exc.value.code == 2  # refuses to silently discard or reuse the partial run
    main(args + ["--output", str(tmp_path / "k"), "--resume"])
    main(args + ["--output", str(tmp_path / "straight")])
    a = load_file(str(tmp_path / "k" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "k" / "report.json").read_text())["resumed_from_block"] == 1


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_calibration_windows_begin_with_bos_only_for_gemma(
    family, tiny_checkpoint, tiny_gemma_checkpoint, calib_file, tmp_path, monkeypatch
):
    """Gemma's calibration windows are BOS + text; LLaMA's are exactly the plain Wanda/SparseGPT windows (the
    smollm2 protocol does not move). The report says which."""
    from sparsedeploy.common.data import calibration_samples
    from sparsedeploy.prune import driver

    checkpoint = tiny_gemma_checkpoint if family == "gemma3" else tiny_checkpoint
    seen: list[torch.Tensor] = []
    real = driver.prune_model
    monkeypatch.setattr(
        driver, "prune_model", lambda model, samples, *a, **k: seen.append(samples) or real(model, samples, *a, **k)
    )
    config = PruneConfig(
        model=str(checkpoint), method="wanda", calib=f"text:{calib_file}", nsamples=4, seqlen=32, device="cpu"
    )
    report = run_prune(config, tmp_path / "out", show_progress=False)
    (samples,) = seen
    assert samples.shape == (4, 32) and report["overall_sparsity"] == pytest.approx(0.5, abs=1e-6)
    tokenizer = load_model(str(checkpoint)).tokenizer
    if family == "gemma3":
        assert samples[:, 0].tolist() == [tokenizer.bos_token_id] * 4 and report["calibration"]["bos_per_window"]
        assert torch.equal(samples, calibration_samples(tokenizer, config.calib, 4, 32, 0, bos=tokenizer.bos_token_id))
    else:
        assert not report["calibration"]["bos_per_window"] and (samples[:, 0] != tokenizer.bos_token_id).any()
        assert torch.equal(samples, calibration_samples(tokenizer, config.calib, 4, 32, 0))
