"""Data-parallel calibration with two CPU processes (gloo), launched by torchrun as a user would."""

import subprocess
import sys

import torch

from sparsedeploy.common.models import load_model
from sparsedeploy.prune.checkpoint import load_masks
from sparsedeploy.prune.driver import PruneConfig, run_prune


def test_two_processes_match_one(tiny_checkpoint, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i % 150} The quick brown fox." for i in range(400)))
    config = PruneConfig(
        model=str(tiny_checkpoint),
        method="wanda",
        sparsity="0.5",
        calib=f"text:{calib}",
        nsamples=4,
        seqlen=24,
        device="cpu",
    )
    run_prune(config, tmp_path / "one", show_progress=False)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
        "-m",
        "sparsedeploy",
        "-q",
        "prune",
        "--model",
        str(tiny_checkpoint),
        "--sparsity",
        "0.5",
        "--calib",
        f"text:{calib}",
        "--nsamples",
        "4",
        "--seqlen",
        "24",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "two"),
        "--json",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["world_size"] == 2
    a = load_masks(tmp_path / "one")
    b = load_masks(tmp_path / "two")
    agree = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    assert agree > 0.999  # sums reduced in another order may flip an exact near-tie, nothing more
    wa = load_model(str(tmp_path / "one")).model.state_dict()
    wb = load_model(str(tmp_path / "two")).model.state_dict()
    close = sum(int(torch.isclose(wa[k], wb[k], atol=1e-6).sum()) for k in wa) / sum(wa[k].numel() for k in wa)
    assert close > 0.999
