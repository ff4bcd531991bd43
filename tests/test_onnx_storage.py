"""Sparse storage: exact round trip, smaller files, clear errors when the side file is missing or broken."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_helpers import pruned_tiny_checkpoint
from sparsedeploy.errors import UserError
from sparsedeploy.export import ExportConfig, export_checkpoint
from sparsedeploy.onnx_storage import SPARSE_FILE, load_model_proto, pack_bits, session_from_path, unpack_bits


def test_bits_round_trip():
    rng = np.random.default_rng(0)
    mask = rng.random(1001) > 0.5
    assert np.array_equal(unpack_bits(pack_bits(mask), mask.size), mask)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    ckpt = pruned_tiny_checkpoint(root / "ckpt", "0.5")
    dense = export_checkpoint(ExportConfig(model=str(ckpt), verify=False), root / "dense")
    sparse = export_checkpoint(ExportConfig(model=str(ckpt), storage="sparse", greedy_tokens=8), root / "sparse")
    return root, dense, sparse


def test_sparse_storage_round_trips_exactly_and_verifies(both):
    root, _, sparse = both
    assert sparse["verification"]["ok"], sparse["verification"]["problems"]
    a = {i.name: numpy_helper.to_array(i) for i in load_model_proto(root / "dense").graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in load_model_proto(root / "sparse").graph.initializer}
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_sparse_storage_is_smaller(both):
    _, dense, sparse = both
    stats = sparse["storage"]
    assert stats["packed_weights"] >= 14
    assert stats["packed_bytes"] < 0.6 * stats["dense_bytes"]  # bitmap + half the values
    assert stats["model_bytes"] < dense["storage"]["model_bytes"]
    assert stats["ort_load_seconds"] > 0


def test_missing_or_corrupt_side_file(both, tmp_path):
    root, _, _ = both
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(root / "sparse", copy)
    (copy / SPARSE_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        session_from_path(copy / "model.onnx")
    (copy / SPARSE_FILE).unlink()
    with pytest.raises(UserError):
        load_model_proto(copy / "model.onnx")
