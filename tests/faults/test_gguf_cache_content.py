"""The GGUF cache is keyed by content: a changed file with the same name and size never serves the old weights."""

import json
import os
import shutil

import pytest
from safetensors.torch import load_file

from sparsedeploy.common.models import CONVERSION_MARK, _gguf_location, file_sha256, resolve_model_path


def _weights(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.slow
def test_same_name_and_size_with_other_bytes_is_converted_again(tmp_path):
    folder, name = _gguf_location("smollm2-135m")
    gguf = tmp_path / "model.gguf"
    shutil.copyfile(folder / name, gguf)
    cache = tmp_path / "cache"
    first = resolve_model_path(str(gguf), cache)
    size = gguf.stat().st_size
    with open(gguf, "r+b") as fh:  # zero the last 8 MiB (tensor data) in place: same name, same size
        fh.seek(size - 8 * 2**20)
        fh.write(bytes(8 * 2**20))
    assert gguf.stat().st_size == size
    second = resolve_model_path(str(gguf), cache)
    assert second != first and second.is_dir() and first.is_dir()
    marks = [json.loads((p / CONVERSION_MARK).read_text())["sha256"] for p in (first, second)]
    assert marks[1] == file_sha256(gguf, cache) and marks[0] != marks[1]
    old, new = _weights(first), _weights(second)
    assert old.keys() == new.keys() and any(not old[k].equal(new[k]) for k in old)  # the new bytes are served
    # unchanged file: the recorded hash is reused (not recomputed) and the same entry is served
    mtime = os.stat(cache / "models" / "hashes.json").st_mtime_ns
    assert resolve_model_path(str(gguf), cache) == second
    assert os.stat(cache / "models" / "hashes.json").st_mtime_ns == mtime
