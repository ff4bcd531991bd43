"""DeepSparse driver parts that need no DeepSparse: the copies the worker gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsedeploy.onnx.storage import save_model_proto
from sparsedeploy.runtimes.deepsparse_env import copy_models, external_data_files


def _matmul_model(seed: int):
    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [w],
    )
    return helper.make_model(graph)


def test_each_copy_takes_only_its_own_external_data(tmp_path):
    """Two models with external data in one folder (as the bench's forms are): each copy gets its own file only."""
    src = tmp_path / "src"
    src.mkdir()
    for name, seed in (("a", 0), ("b", 1)):
        save_model_proto(_matmul_model(seed), src / f"{name}.onnx", external=True)
    (src / "unrelated.onnx_data").write_bytes(b"x" * 100)
    assert external_data_files(src / "a.onnx") == ["a.onnx_data"]
    copies = copy_models({"a": src / "a.onnx", "b": src / "b.onnx"}, tmp_path / "work")
    for name, path in copies.items():
        folder = sorted(p.name for p in (tmp_path / "work").glob(f"*/{name}.onnx*"))
        assert sorted(p.name for p in Path(path).parent.iterdir()) == folder == [f"{name}.onnx", f"{name}.onnx_data"]
        loaded = onnx.load(path)  # external data resolved from the copy's folder
        original = onnx.load(str(src / f"{name}.onnx"))
        assert np.array_equal(
            numpy_helper.to_array(loaded.graph.initializer[0]), numpy_helper.to_array(original.graph.initializer[0])
        )
