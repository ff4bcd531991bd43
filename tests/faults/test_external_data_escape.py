"""An ONNX model whose external-data `location` leaves its folder is refused wherever ONNX files are read or copied."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from sparsedeploy.common.errors import UserError


def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """model/model.onnx whose weight's bytes are declared to live in ../../secret/x (outside the model folder)."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "x").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    w = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../../secret/x"), ("offset", "0"), ("length", "64")):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [w],
    )
    folder = tmp_path / "a" / "model"
    folder.mkdir(parents=True)
    onnx.save_model(helper.make_model(graph), str(folder / "model.onnx"))
    return folder / "model.onnx", secret / "x"


def test_external_data_outside_the_model_folder_is_refused_everywhere(tmp_path):
    from sparsedeploy.bench.forms import matmul_weights
    from sparsedeploy.onnx.storage import load_model_proto, session_from_path
    from sparsedeploy.runtimes.deepsparse_env import copy_models

    model, secret = crafted(tmp_path)
    work = tmp_path / "work"
    readers = {
        "load_model_proto": lambda: load_model_proto(model),
        "session_from_path": lambda: session_from_path(model),
        "copy_models (DeepSparse)": lambda: copy_models({"m": model}, work),
        "matmul_weights (bench)": lambda: matmul_weights(model),
    }
    for name, read in readers.items():
        with pytest.raises(UserError, match=r"external data '\.\./\.\./secret/x' outside its directory") as exc:
            read()
        assert str(model) in str(exc.value), name
    # the copier wrote nothing outside its work folder (nor inside it)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "a/model/model.onnx",
        "secret/x",
    ]
    assert not work.exists() or not any(work.rglob("*.onnx"))
