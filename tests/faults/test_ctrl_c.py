"""Ctrl-C (SIGINT) mid-prune: exit 130, and the message says the finished blocks were kept for --resume."""

import signal

from faultkit import calib_file, cli_process, deep_checkpoint, prune_args, wait_for  # noqa: F401 (fixtures)


def test_ctrl_c_says_finished_blocks_were_kept_for_resume(deep_checkpoint, calib_file, tmp_path):
    out, partial = tmp_path / "o", tmp_path / ".o.partial"
    proc = cli_process(prune_args(deep_checkpoint, calib_file, out, "--nsamples", "4", "--seqlen", "32"))
    assert wait_for(lambda: (partial / "block-0000.safetensors").is_file(), proc), proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.strip().splitlines() if line]
    assert proc.returncode == 130 and len(lines) == 1, err
    assert lines[0].startswith("interrupted: no final output was written; ")
    assert "rerun the same command with --resume" in lines[0] and f"finished block(s) kept in {partial}" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))
