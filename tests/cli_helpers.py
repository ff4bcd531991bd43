"""The CLI run in this process, shared by tests/cli and tests/faults."""

from __future__ import annotations

from sparsedeploy.cli import main


def run_cli(args, capsys):
    """Run `sparsedeploy ARGS` here: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
