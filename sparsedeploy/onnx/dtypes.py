"""ONNX tensor element types: the one table of TensorProto codes, ONNX Runtime type names and NumPy dtypes."""

from __future__ import annotations

import numpy as np

# (TensorProto elem_type, ONNX Runtime's name inside "tensor(...)", NumPy dtype)
ELEM_TYPES: tuple[tuple[int, str, type], ...] = (
    (1, "float", np.float32),
    (10, "float16", np.float16),
    (11, "double", np.float64),
    (7, "int64", np.int64),
    (6, "int32", np.int32),
    (9, "bool", np.bool_),
)

# ONNX Runtime input/output type names -> NumPy dtypes (inputs fed from NumPy are built from it)
ORT_TYPES: dict[str, type] = {f"tensor({name})": dtype for _, name, dtype in ELEM_TYPES}
_ORT_NAMES: dict[int, str] = {code: f"tensor({name})" for code, name, _ in ELEM_TYPES}


def ort_type_name(elem_type: int) -> str:
    """The type string ONNX Runtime's ``get_inputs()`` gives for a TensorProto element type."""
    return _ORT_NAMES.get(elem_type, "tensor(unknown)")


def tensor_bytes(tensor) -> int:
    """The bytes of a TensorProto's data from its dims and type (reading ``raw_data`` would copy it)."""
    from onnx import helper

    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
