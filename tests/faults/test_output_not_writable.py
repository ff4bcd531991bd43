"""An output that cannot be written is refused before any work (prune, eval --output, run), one line, exit 2."""

from faultkit import error_lines, readonly_mount, run_cli  # noqa: F401 (fixtures)


def test_unwritable_output_is_refused_before_any_work(readonly_mount, tmp_path, capsys):
    missing_model = str(tmp_path / "no-such-model")  # would fail later: the output check must come first
    cases = {
        "prune": ["prune", "--model", missing_model, "--output", str(readonly_mount / "o")],
        "eval": [
            "eval",
            "--model",
            missing_model,
            "--data",
            "text:/nonexistent",
            "--output",
            str(readonly_mount / "e.json"),
        ],
        "run": ["run", "--model", missing_model, "--output", str(readonly_mount / "r")],
    }
    for name, args in cases.items():
        code, out, err = run_cli(args, capsys)
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1, (name, err)
        assert "is not writable (Read-only file system in " in lines[0], (name, lines)
        assert str(readonly_mount) in lines[0]
        assert out == ""
