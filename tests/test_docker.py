"""The Dockerfile is linted here (no Docker engine runs on these machines) and installs via the CI script."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def test_dockerfile_lints_clean():
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: install the test extra (pip install -e '.[test]')")
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_targets_use_the_ci_install_script_and_non_root_user():
    text = (REPO / "Dockerfile").read_text()
    targets = re.findall(r"^FROM \S+ AS (\w+)", text, flags=re.M)
    assert {"cpu", "gpu"} <= set(targets)
    assert text.count("bash scripts/install.sh") == 2
    assert "USER 10001" in text and 'ENTRYPOINT ["sparsedeploy"]' in text and "VOLUME" in text
    assert "install.sh" in (REPO / ".ci" / "run").read_text()
    assert (REPO / ".dockerignore").is_file()


def test_cpu_image_takes_cpu_torch_and_finds_the_evaluation_file_on_the_volume():
    text = (REPO / "Dockerfile").read_text()
    cpu = text.split("AS cpu", 1)[1].split("FROM ", 1)[0]
    assert re.search(r'ARG TORCH_INDEX_URL="https://\S+/cpu"', cpu)  # not PyPI's CUDA build by default
    assert "SPARSEDEPLOY_WIKITEXT2=/data/" in text  # quickstart.yaml's eval data, found on the volume
