"""SIGTERM is handled like Ctrl-C: exit 143, one line saying what was kept for --resume, no temporary directory."""

import signal

from faultkit import calib_file, cli_process, deep_checkpoint, prune_args, wait_for  # noqa: F401 (fixtures)


def test_sigterm_mid_prune_cleans_up_and_says_what_was_kept(deep_checkpoint, calib_file, tmp_path):
    out = tmp_path / "o"
    partial = tmp_path / ".o.partial"
    proc = cli_process(prune_args(deep_checkpoint, calib_file, out, "--nsamples", "4", "--seqlen", "32"))
    assert wait_for(lambda: (partial / "block-0001.safetensors").is_file(), proc), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = [line for line in err.strip().splitlines() if line]
    assert (
        len(lines) == 1
        and lines[0].startswith("terminated (SIGTERM): no final output was written; ")
        and f"finished block(s) kept in {partial}: rerun the same command with --resume to continue" in lines[0]
    ), err
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*")) and (partial / "state.json").is_file()


def test_sigterm_during_the_final_write_leaves_no_temporary(tiny_checkpoint, calib_file, tmp_path):
    """The signal arrives exactly while the output is being written (the masks file, inside the temporary directory)."""
    import subprocess
    import sys

    from faultkit import REPO

    script = (
        "import os, signal, sys\n"
        "import sparsedeploy.prune.driver as p\n"
        "def save_then_term(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "p.save_file = save_then_term\n"
        "from sparsedeploy.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-c", script, *prune_args(tiny_checkpoint, calib_file, out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert proc.returncode == 143 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("terminated (SIGTERM): no final output was written; ")
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*")) and not list(tmp_path.glob(".o.old-*"))
