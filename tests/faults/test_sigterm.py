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
    assert len(lines) == 1 and lines[0].startswith("terminated (SIGTERM): no final output was written; ") and \
        f"finished block(s) kept in {partial}: rerun the same command with --resume to continue" in lines[0], err
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*")) and (partial / "state.json").is_file()
