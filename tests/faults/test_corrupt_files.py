"""Corrupt .gguf / .safetensors / .onnx files: one line naming the file, exit 2."""

import shutil

from faultkit import error_lines, run_cli

from sparsedeploy.common.models import _gguf_location


def test_truncated_gguf_is_named(tmp_path, capsys):
    folder, name = _gguf_location("smollm2-135m")
    broken = tmp_path / "broken.gguf"
    with open(folder / name, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(2**20))  # the header and the start of the tensor data only
    code, _, err = run_cli(
        ["eval", "--model", str(broken), "--data", "text:/nonexistent", "--cache-dir", str(tmp_path / "c")], capsys
    )
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot read GGUF file {broken}: it is truncated or corrupt")
    assert not list((tmp_path / "c" / "models").glob("gguf-*"))  # no cache entry half-written


def test_truncated_safetensors_is_named(tiny_checkpoint, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli(["eval", "--model", str(model), "--data", "text:/nonexistent"], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot read {weights}: the file is truncated or corrupt")


def test_corrupt_onnx_is_named(tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"\x08\x07\x12\x04junk" + bytes(range(256)) * 4)
    for args in (["inspect", str(export / "model.onnx")], ["generate", "--onnx", str(export), "--prompt", "hi"]):
        code, _, err = run_cli(args, capsys)
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1, (args, err)
        assert str(export / "model.onnx") in lines[0] and "corrupt" in lines[0], lines
