"""`engines install deepsparse --venv DIR` never deletes a DIR it did not create."""

import pytest
from faultkit import error_lines, listing, run_cli

from sparsedeploy.runtimes import deepsparse_env as ds


def test_install_refuses_a_venv_folder_it_did_not_create(tmp_path, capsys):
    if ds.platform_problem():
        pytest.skip(f"DeepSparse cannot run here, so install stops earlier: {ds.platform_problem()}")
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "main.py").write_text("print('mine')\n")
    code, _, err = run_cli(["engines", "install", "deepsparse", "--venv", str(folder), "--force"], capsys)
    assert code == 2 and len(error_lines(err)) == 1
    assert error_lines(err)[0] == (
        f"error: --venv {folder} exists and was not created by sparsedeploy: "
        "refusing to replace it; choose another --venv or remove it yourself"
    )
    assert listing(folder) == ["main.py"]
