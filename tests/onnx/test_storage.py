"""Sparse storage: exact round trip, smaller files, clear errors when the side file is missing or broken."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from onnx_helpers import pruned_tiny_checkpoint

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.run import ExportConfig, export_checkpoint
from sparsedeploy.onnx.storage import SPARSE_FILE, load_model_proto, pack_bits, session_from_path, unpack_bits


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


def test_a_model_past_the_2gb_limit_is_saved_with_external_data(tmp_path, monkeypatch):
    """ModelProto.ByteSize() raises EncodeError past 2 GB (a 1B model in fp32 is 4.4 GB), so the size is
    summed per tensor; the limit is shrunk here so the test needs kilobytes, not gigabytes."""
    import onnx
    from onnx import helper

    import sparsedeploy.onnx.storage as storage

    def model_with(weights: dict[str, np.ndarray]):
        inits = [numpy_helper.from_array(w, name) for name, w in weights.items()]
        nodes = [helper.make_node("MatMul", ["x", name], [f"y{i}"]) for i, name in enumerate(weights)]
        outs = [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [1, 64]) for i in range(len(weights))]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])], outs, inits
        )
        return helper.make_model(graph)

    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(4)}  # 4 x 16 KiB
    monkeypatch.setattr(storage, "TWO_GB", 64 * 1024**2 + 40 * 1024)  # "2 GB" = the 64 MiB margin + 40 KiB
    assert not storage.too_big_for_one_file(model_with(dict(list(weights.items())[:2])))
    big = model_with(weights)
    assert storage.too_big_for_one_file(big)
    monkeypatch.setattr(
        type(big), "ByteSize", lambda self: (_ for _ in ()).throw(AssertionError("whole-model ByteSize called"))
    )
    storage.save_model_proto(big, tmp_path / "model.onnx")
    data = tmp_path / "model.onnx_data"
    assert data.stat().st_size >= 4 * 64 * 64 * 4
    assert data.stat().st_mode & 0o777 == (tmp_path / "model.onnx").stat().st_mode & 0o777  # not onnx's 0600
    loaded = load_model_proto(tmp_path / "model.onnx")
    assert all(np.array_equal(numpy_helper.to_array(i), weights[i.name]) for i in loaded.graph.initializer)


def test_a_custom_op_library_that_is_missing_or_not_one_is_one_clear_error(sparse_cpu_export, tmp_path):
    _, out, _ = sparse_cpu_export
    with pytest.raises(UserError, match=r"not found: build it with `bash scripts/build_ort_op.sh`"):
        session_from_path(out, custom_op_library=tmp_path / "nope.so")
    not_a_library = tmp_path / "text.so"
    not_a_library.write_text("not a shared library\n")
    with pytest.raises(UserError, match=r"ONNX Runtime cannot load the custom-op library .*text\.so: .*rebuild it"):
        session_from_path(out, custom_op_library=not_a_library)


def test_a_sparse_cpu_export_runs_whole_with_the_custom_op_library(sparse_cpu_export, ort_op_library):
    """With the library registered the export is one ONNX Runtime session (not segmented), same outputs."""
    import onnxruntime as ort

    from sparsedeploy.onnx.segmented import SegmentedSession

    _, out, _ = sparse_cpu_export
    whole = session_from_path(out, threads=1, custom_op_library=ort_op_library)
    segmented = session_from_path(out, threads=1)
    assert isinstance(whole, ort.InferenceSession) and isinstance(segmented, SegmentedSession)
    feeds = {}
    for i in whole.get_inputs():
        dims = [1 if not isinstance(d, int) else d for d in i.shape]
        if i.name.startswith("past_key_values."):
            dims[2] = 0
        feeds[i.name] = np.ones(dims, np.int64) if "int64" in i.type else np.zeros(dims, np.float32)
    for a, b in zip(whole.run(None, feeds), segmented.run(None, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_whole_session_runs_onnx_runtimes_nodes_on_one_thread(sparse_cpu_export, ort_op_library):
    """The kernels take the threads; ONNX Runtime's pool would spin against them (as in the segmented session)."""
    _, out, _ = sparse_cpu_export
    for threads in (2, None):
        whole = session_from_path(out, threads=threads, custom_op_library=ort_op_library)
        assert whole.get_session_options().intra_op_num_threads == 1


def test_onnx_runtime_takes_the_threads_back_only_for_a_large_dense_matmul():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from sparsedeploy.onnx.graph import LARGE_DENSE_WEIGHT_BYTES, ort_threads_beside_kernels

    rows = LARGE_DENSE_WEIGHT_BYTES // (4 * 64) + 1  # a [rows, 64] float weight just over the limit, dims only
    weight = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[rows, 64])  # no data: only dims are read

    def model(op):
        nodes = [helper.make_node(op, ["x", "w"], ["y"])]
        graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        graph.initializer.append(weight)
        return helper.make_model(graph)

    for m, threads, want, spin in (
        (model("MatMul"), 2, 2, "0"),
        (model("MatMul"), None, 0, "0"),  # 0: ONNX Runtime's default
        (model("MatMul"), 1, 1, None),
        (model("Gather"), 2, 1, None),  # an embedding this large is only gathered from
        (None, 2, 1, None),  # the graph not read
    ):
        options = ort.SessionOptions()
        ort_threads_beside_kernels(options, m.graph.node if m else [], m.graph.initializer if m else [], threads)
        assert options.intra_op_num_threads == want
        if spin:
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == spin
