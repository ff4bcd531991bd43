"""The CLI's commands and their flags are built without torch: the vocabularies they are generated from
(prune/choices.py, prune/method_options.py, export/config.py, bench/config.py) are torch-free."""

from __future__ import annotations

import subprocess
import sys


def _imported(code: str) -> set[str]:
    """Modules `python -X importtime -c CODE` imported (full dotted names)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_cli_start_up_imports_no_torch():
    names = _imported("import sparsedeploy.cli.main")
    # the measurement saw the command modules and the vocabularies their flags come from
    assert {"sparsedeploy.cli.prune", "sparsedeploy.prune.method_options", "sparsedeploy.prune.choices"} <= names
    assert not any(name == "torch" or name.startswith("torch.") for name in names)
