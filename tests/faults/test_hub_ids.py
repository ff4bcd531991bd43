"""A misspelt local path is never tried as a Hub id; an explicit org/name offline is one line at once."""

import socket
import time

import pytest
from faultkit import error_lines, run_cli


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in a test that must not use it")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.mark.parametrize("name", ["smollm2-135", "pruned/ouput"])
def test_misspelt_local_paths_are_not_hub_ids(name, tmp_path, capsys, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pruned").mkdir()  # the folder exists: pruned/ouput is a misspelt path inside it
    start = time.monotonic()
    code, _, err = run_cli(["eval", "--model", name, "--data", "text:/nonexistent"], capsys)
    assert code == 2 and error_lines(err) == [
        f"error: --model {name} does not exist: check the path; a Hub model is named org/name "
        "(e.g. HuggingFaceTB/SmolLM2-135M), or use the built-in smollm2-135m"
    ]
    assert time.monotonic() - start < 10 and no_network == []


def test_hub_id_offline_is_one_line_at_once(tmp_path, capsys, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    start = time.monotonic()
    code, _, err = run_cli(["eval", "--model", "someorg/some-model", "--data", "text:/nonexistent"], capsys)
    assert code == 2 and error_lines(err) == [
        "error: --model someorg/some-model is a Hub id but HF_HUB_OFFLINE=1 and it is not in the local Hugging Face "
        "cache: download it while online, or give a local directory"
    ]
    assert time.monotonic() - start < 10 and no_network == []
