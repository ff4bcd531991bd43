"""The sparse-cpu form's scaled-int8 weights: a tied embedding / lm_head (Gather + Transpose -> MatMul) and a plain
MatMul whose weights are exactly int8 x a scale per 32 become Int8Gather / Int8Linear nodes over one stored copy;
the segmented session runs them, against ONNX Runtime on the original graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparsedeploy.kernels.scaled_int8 import unpack
from sparsedeploy.onnx.graph import Graph
from sparsedeploy.onnx.int8_nodes import GATHER_OP, LINEAR_OP, int8_nodes, pack_scaled_int8
from sparsedeploy.onnx.segmented import SegmentedSession
from sparsedeploy.onnx.storage import session_from_path

V, H, F = 50, 64, 96


def q8_0_like(rng, n, k):
    d = (1e-3 + rng.random((n, k // 32)) * 0.05).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    q[:, ::32] = 127
    return (q.reshape(n, k // 32, 32).astype(np.float32) * d[..., None]).reshape(n, k)


def tied_graph(rng):
    """ids -> Gather(E) -> Relu -> MatMul(W_up, exact) -> MatMul(W_down, plain float32) -> MatMul(Transpose(E))."""
    weights = {
        "E": q8_0_like(rng, V, H),  # [V, H]: the tied embedding / lm_head
        "W_up": q8_0_like(rng, F, H).T.copy(),  # [H, F] as a MatMul reads it; exact along its rows of W.T
        "W_down": rng.standard_normal((F, H)).astype(np.float32),  # not int8: stays float32
    }
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="/embed/Gather"),
        helper.make_node("Relu", ["emb"], ["h0"], name="relu"),
        helper.make_node("MatMul", ["h0", "W_up"], ["h1"], name="/up/MatMul"),
        helper.make_node("MatMul", ["h1", "W_down"], ["h2"], name="/down/MatMul"),
        helper.make_node("Transpose", ["E"], ["E_t"], name="Transpose_1"),  # no perm: axes reversed, as torch.onnx
        helper.make_node("MatMul", ["h2", "E_t"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", V]),
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", "s", H]),
        ],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), weights


def _ort(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_tied_embedding_and_exact_matmul_are_stored_once_as_int8_and_run_natively(tmp_path):
    rng = np.random.default_rng(0)
    model, weights = tied_graph(rng)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    summary = pack_scaled_int8(model)
    assert sorted(summary["weights"]) == ["E", "W_up"] and summary["not_exact"] == ["W_down"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(GATHER_OP) == 1 and ops.count(LINEAR_OP) == 2 and "Transpose" not in ops
    inits = {i.name for i in model.graph.initializer}
    assert not {"E", "W_up"} & inits and "W_down" in inits  # no float32 copy of a packed weight
    assert summary["packed_bytes"] < 0.3 * summary["dense_bytes"]
    nodes = {n.nodes[0]: n for n in int8_nodes(model)}
    assert nodes["/embed/Gather"].weight is nodes["/lm_head/MatMul"].weight  # the tied pair shares one weight
    assert np.array_equal(unpack(nodes["/lm_head/MatMul"].weight).view(np.uint32), weights["E"].view(np.uint32))
    assert np.array_equal(unpack(nodes["/up/MatMul"].weight), weights["W_up"].T)
    found = {w.node: w for w in Graph(model).matmul_weights()}  # inspection and the export's checks see it
    assert np.array_equal(found["/lm_head/MatMul"].matrix, weights["E"].T)

    onnx.save(model, str(tmp_path / "model.onnx"))
    session = session_from_path(tmp_path / "model.onnx", threads=1)
    assert isinstance(session, SegmentedSession) and session.int8_node_count == 3 and session.linear_count == 0
    for ids in (np.array([[3, 49, 0]]), np.array([[7]]), rng.integers(0, V, (2, 9))):
        logits, emb = session.run(None, {"ids": ids})
        want_logits, want_emb = _ort(original, {"ids": ids})
        assert np.array_equal(emb.view(np.uint32), want_emb.view(np.uint32))  # the lookup is exact
        assert np.abs(logits - want_logits).max() <= 1e-5 * np.abs(want_logits).max()  # float32 sums, other order


def test_a_weight_read_by_anything_else_stays_float32():
    model, _ = tied_graph(np.random.default_rng(1))
    model.graph.node.append(helper.make_node("Identity", ["E"], ["E_copy"], name="id"))
    model.graph.output.append(helper.make_tensor_value_info("E_copy", TensorProto.FLOAT, [V, H]))
    summary = pack_scaled_int8(model)
    assert summary["weights"] == ["W_up"]
    assert "E" in {i.name for i in model.graph.initializer}
