"""A real full file system (a 2 MiB tmpfs): safetensors raises SafetensorError, not OSError; one line, exit 2,
naming the device and the space needed, and nothing half-written."""

import os

import pytest
import torch
from faultkit import calib_file, error_lines, prune_args, run_cli, tmpfs  # noqa: F401 (fixtures)
from safetensors.torch import save_file

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.files import atomic_dir


def _fill(point, leave: int) -> None:
    stat = os.statvfs(point)
    with open(point / "filler", "wb") as fh:
        fh.write(bytes(max(0, stat.f_bavail * stat.f_frsize - leave)))


def test_full_disk_is_one_line_naming_the_device_and_the_space(tiny_checkpoint, calib_file, tmpfs, capsys):
    # the library path: safetensors' own error on the real device
    with pytest.raises(UserError) as exc, atomic_dir(tmpfs / "direct", need_bytes=3 * 2**20) as tmp:
        save_file({"w": torch.zeros(3 * 2**20 // 4)}, str(tmp / "w.safetensors"))
    assert f"No space left on device tmpfs (mounted at {tmpfs})" in str(exc.value)
    assert "about 3.0 MiB needed" in str(exc.value)
    assert os.listdir(tmpfs) == []  # the temporary directory is gone
    # the CLI: prune into the nearly full file system
    _fill(tmpfs, 256 * 1024)
    out = tmpfs / "pruned"
    code, _, err = run_cli(prune_args(tiny_checkpoint, calib_file, out), capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: writing ") and f"No space left on device tmpfs (mounted at {tmpfs})" in lines[0]
    assert "MiB free" in lines[0] and "needed" in lines[0] and "Traceback" not in err
    left = sorted(os.listdir(tmpfs))
    assert not out.exists() and not [n for n in left if ".tmp" in n]
    assert set(left) <= {"filler", ".pruned.partial"}  # at most the finished blocks, kept for --resume
