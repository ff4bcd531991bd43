"""`.NAME.tmp-*` / `.NAME.old-*` directories that earlier (dead) runs left are cleaned by the next write;
a live run's, and anything sparsedeploy did not write, are left alone."""

import os

from faultkit import calib_file, listing, prune_args, run_cli  # noqa: F401 (fixtures)

from sparsedeploy.common.files import MARKER


def test_stale_temporaries_of_dead_runs_are_removed(tiny_checkpoint, calib_file, tmp_path, capsys):
    dead = 2**22 + 12345  # above the default pid_max of 4194304: no such process
    stale = [tmp_path / f".o.tmp-{dead}-abcd", tmp_path / f".o.old-{dead}"]
    for folder in stale:
        folder.mkdir()
        (folder / MARKER).write_text("{}")
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".o.tmp-{os.getppid()}-live"  # a running process's (our parent's) temporary
    live.mkdir()
    (live / MARKER).write_text("{}")
    foreign = tmp_path / f".o.tmp-{dead}-user"  # same pattern, but not written by sparsedeploy
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"1")
    code, _, err = run_cli(prune_args(tiny_checkpoint, calib_file, tmp_path / "o"), capsys)
    assert code == 0, err
    assert not any(folder.exists() for folder in stale)
    assert live.is_dir() and listing(foreign) == ["data.bin"] and (tmp_path / "o" / MARKER).is_file()
