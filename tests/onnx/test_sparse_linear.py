"""The sparse-cpu graph form: packing decoder MatMuls into SparseLinear nodes, reading them back, and running the
packed graph (ONNX Runtime segments + sparsedeploy's kernels) against ONNX Runtime on the original graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsedeploy.onnx.graph import Graph
from sparsedeploy.onnx.segmented import SegmentedSession
from sparsedeploy.onnx.sparse_linear import OP_TYPE, pack_linears, sparse_linear_nodes, unpacked
from sparsedeploy.onnx.storage import session_from_path

K = 40  # not a multiple of the 16-wide mask groups


def _weight(rng, k, n, sparsity):
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.random((k, n)) < sparsity] = 0.0
    return w


def _attention_like_graph(rng):
    """x -> q, k, v (one input, fused), o = Relu(q + k + v) -> o_proj (alone), and a dense MatMul left as it is."""
    ws = {
        "q": _weight(rng, K, 24, 0.6),
        "k": _weight(rng, K, 8, 0.6),
        "v": _weight(rng, K, 8, 0.7),
        "o": _weight(rng, 8, K, 0.5),
        "dense": _weight(rng, K, 8, 0.0),
    }
    nodes = [
        helper.make_node("MatMul", ["x", f"W_{n}"], [f"{n}_out"], name=f"/layers.0/attn/{n}_proj/MatMul")
        for n in ("q", "k", "v")
    ]
    nodes += [
        helper.make_node("Slice", ["q_out", "zero", "eight", "minus_one"], ["q8"], name="slice"),
        helper.make_node("Add", ["q8", "k_out"], ["qk"], name="add0"),
        helper.make_node("Add", ["qk", "v_out"], ["qkv"], name="add1"),
        helper.make_node("Relu", ["qkv"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "W_o"], ["y"], name="/layers.0/attn/o_proj/MatMul"),
        helper.make_node("MatMul", ["x", "W_dense"], ["z"], name="/lm_head/MatMul"),
    ]
    inits = [numpy_helper.from_array(w, f"W_{n}") for n, w in ws.items()]
    inits += [
        numpy_helper.from_array(np.array([v], np.int64), name)
        for name, v in (("zero", 0), ("eight", 8), ("minus_one", -1))
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", K]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "s", 8]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), ws


def _ort(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_pack_fuses_shared_inputs_keeps_dense_and_is_lossless():
    model, ws = _attention_like_graph(np.random.default_rng(0))
    summary = pack_linears(model)
    assert summary["linears"] == 4 and summary["nodes"] == 2  # q/k/v fused, o alone; the dense MatMul is kept
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(OP_TYPE) == 2 and ops.count("MatMul") == 1 and "Split" in ops
    assert not {"W_q", "W_k", "W_v", "W_o"} & {i.name for i in model.graph.initializer}  # no dense copy left
    nodes = sparse_linear_nodes(model)
    got = {name: w for node in nodes for name, w in unpacked(node)}
    for n in ("q", "k", "v", "o"):
        assert np.array_equal(got[f"/layers.0/attn/{n}_proj/MatMul"].view(np.uint32), ws[n].view(np.uint32))
    onnx.checker.check_model(model)


def test_packed_weights_are_traced_under_their_original_names():
    model, ws = _attention_like_graph(np.random.default_rng(1))
    pack_linears(model)
    weights = {w.node: w for w in Graph(model).matmul_weights()}
    assert set(weights) == {f"/layers.0/attn/{n}_proj/MatMul" for n in "qkvo"} | {"/lm_head/MatMul"}
    assert np.array_equal(weights["/layers.0/attn/v_proj/MatMul"].matrix, ws["v"])


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 130)])
def test_segmented_run_matches_onnx_runtime_on_the_original(shape):
    model, _ = _attention_like_graph(np.random.default_rng(2))
    x = np.random.default_rng(3).standard_normal((*shape, K)).astype(np.float32)
    expected = _ort(model, {"x": x})
    pack_linears(model)
    got = SegmentedSession(model, threads=2).run(None, {"x": x})
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_session_factory_opens_a_packed_file_segmented(tmp_path):
    model, _ = _attention_like_graph(np.random.default_rng(4))
    x = np.random.default_rng(5).standard_normal((1, 3, K)).astype(np.float32)
    expected = _ort(model, {"x": x})
    pack_linears(model)
    onnx.save(model, tmp_path / "model.onnx")
    session = session_from_path(tmp_path / "model.onnx", threads=1)
    assert isinstance(session, SegmentedSession)
    assert [i.name for i in session.get_inputs()] == ["x"] and [o.name for o in session.get_outputs()] == ["y", "z"]
    np.testing.assert_allclose(session.run(["y"], {"x": x})[0], expected[0], rtol=1e-5, atol=1e-5)


def test_threshold_leaves_lightly_pruned_weights_dense():
    model, _ = _attention_like_graph(np.random.default_rng(6))
    summary = pack_linears(model, min_sparsity=0.65)
    assert summary["linears"] == 1  # only v (70 %) qualifies
    assert [n.linears for n in sparse_linear_nodes(model)] == [("/layers.0/attn/v_proj/MatMul",)]


def test_corrupt_packed_weight_is_named():
    model, _ = _attention_like_graph(np.random.default_rng(7))
    pack_linears(model)
    node = next(n for n in model.graph.node if n.op_type == OP_TYPE)
    block_ptr = next(i for i in model.graph.initializer if i.name == node.input[3])
    bad = numpy_helper.to_array(block_ptr).copy()
    bad[-1] += 1
    block_ptr.CopyFrom(numpy_helper.from_array(bad, block_ptr.name))
    with pytest.raises(ValueError, match=node.name):
        sparse_linear_nodes(model)
