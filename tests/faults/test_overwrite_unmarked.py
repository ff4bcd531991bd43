"""--overwrite replaces only a directory sparsedeploy wrote (it carries the output marker)."""

from faultkit import calib_file, error_lines, listing, prune_args, run_cli  # noqa: F401 (fixtures)

from sparsedeploy.common.files import MARKER


def test_overwrite_refuses_a_directory_sparsedeploy_did_not_write(tiny_checkpoint, calib_file, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept by the user")
    code, _, err = run_cli(prune_args(tiny_checkpoint, calib_file, mine, "--overwrite"), capsys)
    assert code == 2 and error_lines(err) == [
        f"error: refusing to replace {mine} with --overwrite: it was not written by sparsedeploy (no {MARKER} in it); "
        "move it away or choose another output"
    ]
    assert listing(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "kept by the user"
    assert not list(tmp_path.glob(".mine.*"))  # refused before any work: no partial, no temp


def test_overwrite_replaces_its_own_output(tiny_checkpoint, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(prune_args(tiny_checkpoint, calib_file, out), capsys)[0] == 0
    assert (out / MARKER).is_file()
    (out / "stale.txt").write_text("from the first run")
    code, _, err = run_cli(prune_args(tiny_checkpoint, calib_file, out, "--overwrite"), capsys)
    assert code == 0, err
    assert (out / MARKER).is_file() and not (out / "stale.txt").exists() and (out / "report.json").is_file()
