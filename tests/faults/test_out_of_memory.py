"""Out of memory (a real allocation failure under an address-space limit): one line naming the stage and the remedy."""

import subprocess
import sys
import textwrap

from faultkit import REPO, calib_file, deep_checkpoint  # noqa: F401 (fixtures)

SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch, transformers, sparsedeploy.prune, sparsedeploy.cli
    from transformers import LlamaForCausalLM
    size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
    limit = size + 300 * 2**20  # room to load the small model, not for a million calibration windows
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sparsedeploy.cli.main(sys.argv[1:])
""")


def test_out_of_memory_names_the_stage_and_the_remedy(deep_checkpoint, calib_file, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            "-q",
            "prune",
            "--model",
            str(deep_checkpoint),
            "--calib",
            f"text:{calib_file}",
            "--nsamples",
            "1000000",
            "--seqlen",
            "256",
            "--device",
            "cpu",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert proc.returncode == 2 and lines == [
        "error: out of memory in stage prune: use --offload cpu or --offload disk, "
        "or fewer --nsamples / a shorter --seqlen"
    ], proc.stderr[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))
