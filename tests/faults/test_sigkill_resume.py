"""SIGKILL mid-prune, then --resume: the result is bit-identical to an uninterrupted run."""

import signal

from faultkit import calib_file, cli_process, deep_checkpoint, prune_args, wait_for  # noqa: F401 (fixtures)
from safetensors.torch import load_file


def test_resume_after_sigkill_is_bit_identical(deep_checkpoint, calib_file, tmp_path):
    args = ("--method", "wanda", "--nsamples", "4", "--seqlen", "32")
    reference = cli_process(prune_args(deep_checkpoint, calib_file, tmp_path / "ref", *args))
    assert reference.wait(timeout=600) == 0, reference.communicate()
    out, partial = tmp_path / "o", tmp_path / ".o.partial"
    proc = cli_process(prune_args(deep_checkpoint, calib_file, out, *args))
    assert wait_for(lambda: (partial / "block-0002.safetensors").is_file(), proc), proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    resumed = cli_process(prune_args(deep_checkpoint, calib_file, out, *args, "--resume"))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    for name in ("model.safetensors", "masks.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    assert not partial.exists()
