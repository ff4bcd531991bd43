"""`bench -o DIR` never replaces an existing DIR without --overwrite, nor one sparsedeploy did not write."""

from faultkit import error_lines, listing, run_cli

from sparsedeploy.common.files import MARKER


def test_bench_output_is_not_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.csv").write_text("1,2,3\n")
    code, _, err = run_cli(["bench", "--model", str(tmp_path / "model"), "-o", str(out)], capsys)
    assert code == 2
    assert error_lines(err) == [f"error: output {out} already exists: choose another --output or pass --overwrite"]
    code, _, err = run_cli(["bench", "--model", str(tmp_path / "model"), "-o", str(out), "--overwrite"], capsys)
    assert code == 2 and MARKER in err
    assert error_lines(err)[0].startswith(f"error: refusing to replace {out} with --overwrite")
    assert listing(out) == ["keep.csv"] and (out / "keep.csv").read_text() == "1,2,3\n"
