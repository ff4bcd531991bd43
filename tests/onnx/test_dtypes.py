"""The one ONNX type table agrees with ONNX's own mapping and with what ONNX Runtime reports."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsedeploy.onnx.dtypes import ELEM_TYPES, ORT_TYPES, ort_type_name, tensor_bytes


@pytest.mark.parametrize("code,name,dtype", ELEM_TYPES)
def test_table_matches_onnx_mapping(code, name, dtype):
    assert np.dtype(dtype) == helper.tensor_dtype_to_np_dtype(code)
    assert ORT_TYPES[ort_type_name(code)] is dtype


def test_names_are_what_onnx_runtime_reports():
    ort = pytest.importorskip("onnxruntime")
    inputs = [helper.make_tensor_value_info(f"x{code}", code, [2]) for code, _, _ in ELEM_TYPES]
    outputs = [helper.make_tensor_value_info(f"y{code}", code, [2]) for code, _, _ in ELEM_TYPES]
    nodes = [helper.make_node("Identity", [f"x{code}"], [f"y{code}"]) for code, _, _ in ELEM_TYPES]
    model = helper.make_model(
        helper.make_graph(nodes, "types", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reported = {i.name: i.type for i in session.get_inputs()}
    assert reported == {f"x{code}": ort_type_name(code) for code, _, _ in ELEM_TYPES}


def test_unknown_code_is_named_unknown():
    assert ort_type_name(TensorProto.STRING) == "tensor(unknown)"


def test_tensor_bytes_is_dims_times_item_size():
    for array in (np.zeros((3, 5), np.float32), np.zeros(7, np.int64), np.zeros((2, 0), np.float16), np.float32(1)):
        assert tensor_bytes(numpy_helper.from_array(np.asarray(array))) == np.asarray(array).nbytes
