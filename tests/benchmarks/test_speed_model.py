"""benchmarks/speed_model.sh refuses a part it does not know, or a part whose inputs are missing, in one line."""

import subprocess

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "speed_model.sh"


def _run(work, part):
    return subprocess.run(["bash", str(SCRIPT), str(work), part], capture_output=True, text=True, timeout=60)


def test_unknown_part_is_one_line_and_exit_2_creating_nothing(tmp_path):
    work = tmp_path / "work"
    proc = _run(work, "deepsparse1B")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "speed_model.sh: unknown part 'deepsparse1B': use one of smollm2 llama1b sparsecpu deepsparse70 sparsecpu1b "
        "deepsparse1b ortop all"
    ]
    assert not work.exists()


def test_deepsparse1b_without_the_1b_checkpoint_says_which_part_makes_it(tmp_path):
    work = tmp_path / "work"
    proc = _run(work, "deepsparse1b")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"speed_model.sh: {work}/llama1b/mag70 is missing: run the sparsecpu1b part with the same WORK_DIR first"
    ]
    assert not work.exists()
