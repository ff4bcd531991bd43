"""The segmented session: a segment's large initializers reach ONNX Runtime as arrays, not inside its bytes."""

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sparsedeploy.onnx import segmented
from sparsedeploy.onnx.dtypes import tensor_bytes
from sparsedeploy.onnx.segmented import SegmentedSession


def test_a_large_initializer_is_handed_over_as_an_array_and_gives_the_same_outputs(monkeypatch):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((600, 600)).astype(np.float32)  # 1.44 MB: above the inline limit
    small = rng.standard_normal(600).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 600])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 600])],
        [numpy_helper.from_array(big, "w"), numpy_helper.from_array(small, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert tensor_bytes(model.graph.initializer[0]) == big.nbytes > segmented.INLINE_BYTES
    stubbed = []
    stub = segmented._stub
    monkeypatch.setattr(segmented, "_stub", lambda t: stubbed.append(t.name) or stub(t))
    x = rng.standard_normal((3, 600)).astype(np.float32)
    got = SegmentedSession(model, threads=1).run(["y"], {"x": x})[0]
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})
    assert stubbed == ["w"]  # the bias stays inside the segment
    np.testing.assert_allclose(got, expected[0], rtol=1e-5, atol=1e-5)
    assert len(stub(model.graph.initializer[0]).SerializeToString()) < 200  # the stub carries no data


def test_only_a_segment_multiplying_by_a_large_weight_gets_the_sessions_threads():
    """A dense lm_head's GEMV runs on the session's threads (its pool not spinning); every other segment on one."""
    rng = np.random.default_rng(1)
    big = rng.standard_normal((4200, 1024)).astype(np.float32)  # 17.2 MB: a large dense weight
    table = rng.standard_normal((600, 4200)).astype(np.float32)  # 10 MB, above the inline limit, only gathered from
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1024])],
        [numpy_helper.from_array(big, "w"), numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    ids = np.array([3, 599, 0], np.int64)
    for threads, want in ((2, 2), (1, 1)):
        session = SegmentedSession(model, threads=threads)
        np.testing.assert_allclose(session.run(["y"], {"ids": ids})[0], table[ids] @ big, rtol=1e-4, atol=1e-3)
        (segment,) = [s for s in session.steps if isinstance(s, segmented._Segment)]
        options = segment.session.get_session_options()
        assert options.intra_op_num_threads == want
        if want > 1:
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    gather_only = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4200])],
        [numpy_helper.from_array(table, "table")],
    )
    session = SegmentedSession(helper.make_model(gather_only, opset_imports=[helper.make_opsetid("", 18)]), threads=2)
    session.run(["y"], {"ids": ids})
    (segment,) = [s for s in session.steps if isinstance(s, segmented._Segment)]
    assert segment.session.get_session_options().intra_op_num_threads == 1
