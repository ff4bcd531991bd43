"""The segments run by native code: the exporter's residual + RMSNorm and SiLU * up forms against ONNX Runtime,
what is refused, the first-run check, the run-time fallback, and the segmented session on a real export."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsedeploy.export.report import summary
from sparsedeploy.onnx import fused_segment
from sparsedeploy.onnx.decoder import OnnxDecoder
from sparsedeploy.onnx.fused_segment import FusedSegment, Unsupported
from sparsedeploy.onnx.segmented import SegmentedSession

H = 48


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def rmsnorm_nodes():
    """The residual add + RMSNorm + shape plumbing exactly as torch.onnx writes LLaMA's (see a sparse-cpu export)."""
    n = helper.make_node
    nodes = [
        n("Add", ["res", "lin"], ["add"]),
        n("Cast", ["add"], ["cast"], to=TensorProto.FLOAT),
        n("Pow", ["cast", "two"], ["pow"]),
        n("ReduceMean", ["pow", "axes"], ["mean"], keepdims=1),
        n("Add", ["mean", "eps"], ["meps"]),
        n("Sqrt", ["meps"], ["sqrt"]),
        n("Div", ["one", "sqrt"], ["inv"]),
        n("Mul", ["cast", "inv"], ["normed"]),
        n("Cast", ["normed"], ["normed32"], to=TensorProto.FLOAT),
        n("Mul", ["weight", "normed32"], ["out"]),
        n("Shape", ["out"], ["shape"]),
        n("Gather", ["shape", "zero"], ["batch"], axis=0),
    ]
    rng = np.random.default_rng(0)
    inits = [
        _const("two", 2.0),
        _const("axes", [-1], np.int64),
        _const("eps", 1e-5),
        _const("one", 1.0),
        _const("weight", rng.standard_normal(H)),
        _const("zero", 0, np.int64),
    ]
    return nodes, ["res", "lin"], ["cast", "out", "batch"], inits


def silu_nodes():
    n = helper.make_node
    nodes = [
        n("Split", ["gu", "sizes"], ["gate", "up"], axis=-1),
        n("Sigmoid", ["gate"], ["sig"]),
        n("Mul", ["gate", "sig"], ["silu"]),
        n("Mul", ["silu", "up"], ["out"]),
    ]
    return nodes, ["gu"], ["out"], [_const("sizes", [H, H], np.int64)]


def ort_run(nodes, inputs, outputs, inits, feeds):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, None) for i in inputs],
        [helper.make_value_info(o, onnx.TypeProto()) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)
    }
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(o, types[o], None) for o in outputs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("form", [rmsnorm_nodes, silu_nodes])
def test_the_exporters_forms_match_onnx_runtime(form, rows):
    nodes, inputs, outputs, inits = form()
    rng = np.random.default_rng(rows)
    width = 2 * H if form is silu_nodes else H
    feeds = {i: (3 * rng.standard_normal((1, rows, width))).astype(np.float32) for i in inputs}
    segment = FusedSegment.build(nodes, inputs, outputs, inits)
    expected = ort_run(nodes, inputs, outputs, inits, feeds)
    got = segment.run(feeds)
    assert segment.check_against(expected, got) is None
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=3e-5, atol=1e-6)  # ONNX Runtime's Sigmoid is an approximation


def _set(items, index, value):
    items[index] = value


@pytest.mark.parametrize(
    "form, change, problem",
    [
        (rmsnorm_nodes, lambda n, i, o: n.append(helper.make_node("Softmax", ["out"], ["sm"])), "Softmax after"),
        (rmsnorm_nodes, lambda n, i, o: _set(i, 0, _const("two", 3.0)), "Pow is not a square"),
        (rmsnorm_nodes, lambda n, i, o: _set(i, 1, _const("axes", [0], np.int64)), "ReduceMean is not over the last"),
        (rmsnorm_nodes, lambda n, i, o: _set(i, 4, _const("weight", np.ones((2, H)))), "norm weight"),
        (rmsnorm_nodes, lambda n, i, o: o.append("mean"), "hands on an intermediate"),
        (
            rmsnorm_nodes,
            lambda n, i, o: n.insert(1, helper.make_node("Cast", ["add"], ["h"], to=TensorProto.FLOAT16)),
            "neither residual add",
        ),
        (rmsnorm_nodes, lambda n, i, o: _set(n, 1, helper.make_node("Cast", ["add"], ["cast"], to=10)), "Cast after"),
        (silu_nodes, lambda n, i, o: _set(i, 0, _const("sizes", [H, H + 1], np.int64)), "two equal halves"),
        (silu_nodes, lambda n, i, o: _set(n, 2, helper.make_node("Mul", ["up", "sig"], ["silu"])), "SiLU's Mul"),
        (silu_nodes, lambda n, i, o: o.append("sig"), "hands on an intermediate"),
    ],
)
def test_what_it_does_not_run_is_refused(form, change, problem):
    nodes, inputs, outputs, inits = form()
    change(nodes, inits, outputs)
    with pytest.raises(Unsupported, match=problem):
        FusedSegment.build(nodes, inputs, outputs, inits)


def test_inputs_the_form_does_not_take_go_to_the_fallback():
    nodes, inputs, outputs, inits = rmsnorm_nodes()
    segment = FusedSegment.build(nodes, inputs, outputs, inits)
    segment.fallback = lambda feeds: ["from the fallback"]
    broadcast = {"res": np.ones((1, 1, H), np.float32), "lin": np.ones((1, 3, H), np.float32)}
    assert segment.run(broadcast) == ["from the fallback"]
    as_float64 = {"res": np.ones((1, 3, H)), "lin": np.ones((1, 3, H))}
    assert segment.run(as_float64) == ["from the fallback"]
    same = {"res": np.ones((1, 3, H), np.float32), "lin": np.ones((1, 3, H), np.float32)}
    assert segment.run(same)[1].shape == (1, 3, H)


def test_the_first_run_check_names_what_differs():
    nodes, inputs, outputs, inits = rmsnorm_nodes()
    segment = FusedSegment.build(nodes, inputs, outputs, inits)
    feeds = {i: np.ones((1, 2, H), np.float32) for i in inputs}
    got = segment.run(feeds)
    off = [g.copy() for g in got]
    off[1][0, 0, 3] += 1e-3
    assert "out: differs by up to 0.001" in segment.check_against(off, got)
    assert got[2].shape == () and int(got[2]) == 1
    off = [got[0], got[1], np.array(2, np.int64)]
    assert "batch: 1 against ONNX Runtime's 2" in segment.check_against(off, got)
    reshaped = [got[0], got[1], np.array([1], np.int64)]
    assert "batch: int64[1] against ONNX Runtime's int64[]" in segment.check_against(got, reshaped)


def decoder(out, session) -> OnnxDecoder:
    return dataclasses.replace(OnnxDecoder.load(out, threads=1), session=session)


def test_a_segment_that_disagrees_goes_back_to_onnx_runtime(sparse_cpu_export, monkeypatch, caplog):
    """A native SiLU * up that is 1 % off (a broken kernel) is caught by the first-run check: ONNX Runtime keeps
    those segments, the RMSNorm ones stay native, and the model's outputs are ONNX Runtime's."""
    _checkpoint, out, _report = sparse_cpu_export
    right = fused_segment.native.silu_mul
    monkeypatch.setattr(fused_segment.native, "silu_mul", lambda x: right(x) * np.float32(1.01))
    model = onnx.load(str(out / "model.onnx"))
    session = SegmentedSession(model, threads=1)
    ids = np.array([[5, 6, 7]])
    logits, _ = decoder(out, session).run(ids, np.ones((1, 3), np.int64), None)
    again, _ = decoder(out, session).run(ids, np.ones((1, 3), np.int64), None)
    assert session.fused_segment_count("silu_mul") == 0  # not the 2 SiLU * up segments
    assert session.fused_segment_count("add_rmsnorm") == 3 and session.fused_segment_count("attention") == 2
    assert caplog.text.count("(silu_mul) stays with ONNX Runtime: ") == 2
    plain, _ = decoder(out, SegmentedSession(model, threads=1, fuse=False)).run(ids, np.ones((1, 3), np.int64), None)
    np.testing.assert_allclose(again, plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)


def test_segmented_session_runs_the_small_segments_natively(sparse_cpu_export):
    _checkpoint, out, _report = sparse_cpu_export
    model = onnx.load(str(out / "model.onnx"))
    fast, plain = SegmentedSession(model, threads=1), SegmentedSession(model, threads=1, fuse=False)
    ids = np.array([[5, 6, 7, 8]])
    results = []
    for session in (fast, plain):
        runner = decoder(out, session)
        logits, past = runner.run(ids, np.ones((1, 4), np.int64), None)
        step, present = runner.run(logits[:, -1:].argmax(-1), np.ones((1, 5), np.int64), past)
        results.append((logits, step, *past, *present))
    # 2 layers: residual + RMSNorm after attention and after the MLP (but the last), SiLU * up, attention: 7 segments
    assert fast.fused_segment_count() == 7 and plain.fused_segment_count() == 0
    assert fast.fused_segment_count("attention") == 2
    assert fast.segment_count == plain.segment_count
    for a, b in zip(results[0], results[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_native_segments_pass_the_export_check_on_the_real_model(smollm_wanda70_sparse_cpu):
    """smollm2-135m, Wanda 70 %, exported for sparse-cpu: the export's own check (every zero, logits within 1e-4 of
    PyTorch, 32 greedy tokens) runs through the native residual + RMSNorm and SiLU * up segments and the scaled-int8
    embedding lookup and lm_head, and passes (artifact <= 0.4x the dense weights), and
    greedy decoding gives the same tokens with and without them."""
    _, out = smollm_wanda70_sparse_cpu
    report = json.loads((out / "export_report.json").read_text())
    assert report["verification"]["ok"] and report["verification"]["parity"]["greedy_identical"]
    # the Q8_0 tied embedding / lm_head is stored once as scaled-int8, so the artifact is <= 0.4x the dense weights
    assert report["sparse_cpu"]["scaled_int8"]["weights"] == ["model.embed_tokens.weight"]
    dense = report["sparse_cpu"]["dense_bytes"] + report["sparse_cpu"]["scaled_int8"]["dense_bytes"]
    assert report["storage"]["model_bytes"] <= 0.4 * dense
    assert summary(report, out)[0]["size_vs_dense"] <= 0.4  # as the export's summary line reports it
    fast = OnnxDecoder.load(out, threads=1)
    plain = dataclasses.replace(fast, session=SegmentedSession(onnx.load(fast.path), threads=1, fuse=False))
    last = OnnxDecoder.load(out, threads=1, last_logits=True)  # the int8 lm_head on the last row only
    prompt = np.array([[504, 3575, 282, 4649, 314]])  # "The capital of France is" in smollm2's vocabulary
    tokens = [decoder.greedy(prompt, 16).tolist() for decoder in (fast, plain, last)]
    assert last.last_logits and last.run(prompt, np.ones_like(prompt), None)[0].shape == (1, 1, 49152)
    assert tokens[2] == tokens[0]
    # 60 residual + RMSNorm (the final one too: the int8 lm_head after it is a native step), 30 SiLU * up, 30 attention
    assert fast.session.fused_segment_count() == 120 and plain.session.fused_segment_count() == 0
    assert fast.session.fused_segment_count("attention") == 30
    assert fast.session.int8_node_count == 2
    assert tokens[0] == tokens[1]


def attention_segment(out):
    """The first layer's attention segment of the tiny sparse-cpu export: (nodes, inputs, outputs, initializers)."""
    session = SegmentedSession(onnx.load(str(out / "model.onnx")), threads=1)
    segment = next(s for s in session.steps if "Softmax" in [n.op_type for n in getattr(s, "nodes", [])])
    nodes = [onnx.NodeProto() for _ in segment.nodes]
    for copy, node in zip(nodes, segment.nodes, strict=True):
        copy.CopyFrom(node)
    return nodes, list(segment.inputs), list(segment.outputs), list(segment.initializers)


def _made_by(nodes, value):
    return next(n for n in nodes if value in n.output)


def rotate_the_other_way(nodes, outputs):
    """[x[:d/2], -x[d/2:]] instead of [-x[d/2:], x[:d/2]] in the query's rotary."""
    turn = next(n for n in nodes if n.op_type == "Concat" and _made_by(nodes, n.input[0]).op_type == "Neg")
    turn.input[:] = [turn.input[1], turn.input[0]]


def keys_not_transposed(nodes, outputs):
    keys = next(n for n in nodes if n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 1, 3, 2])
    keys.attribute[0].ints[:] = [0, 1, 2, 3]


def softmax_over_heads(nodes, outputs):
    softmax = next(n for n in nodes if n.op_type == "Softmax")
    del softmax.attribute[:]
    softmax.attribute.append(helper.make_attribute("axis", 1))


def mask_inverted(nodes, outputs):
    """Where(mask, -inf, 0): the mask's True would mean "hidden"."""
    where = next(n for n in nodes if n.op_type == "Where" and _made_by(nodes, n.input[0]).op_type == "Slice")
    where.input[1], where.input[2] = where.input[2], where.input[1]


def hands_on_the_probabilities(nodes, outputs):
    outputs.append(next(n for n in nodes if n.op_type == "Softmax").output[0])


@pytest.mark.parametrize(
    "change, problem",
    [
        (rotate_the_other_way, "the query rotary is not made by a Neg"),
        (keys_not_transposed, r"the keys are not transposed \[0, 1, 3, 2\]"),
        (softmax_over_heads, "Softmax is not over the last axis"),
        (mask_inverted, r"the mask term is not Where\(mask, 0, -inf\)"),
        (hands_on_the_probabilities, "hands on an intermediate of the attention"),
    ],
)
def test_attention_forms_it_does_not_run_are_refused(sparse_cpu_export, change, problem):
    nodes, inputs, outputs, inits = attention_segment(sparse_cpu_export[1])
    assert FusedSegment.build(nodes, inputs, outputs, inits).kind == "attention"  # the form as exported is taken
    change(nodes, outputs)
    with pytest.raises(Unsupported, match=problem):
        FusedSegment.build(nodes, inputs, outputs, inits)


def test_a_wrong_attention_kernel_is_caught_on_the_first_call(sparse_cpu_export, monkeypatch, caplog):
    """An attention kernel 1 % off is caught on the first (prefill) call: ONNX Runtime runs those segments from then
    on and the model's outputs are ONNX Runtime's."""
    _checkpoint, out, _report = sparse_cpu_export
    right = fused_segment.native.attention
    monkeypatch.setattr(fused_segment.native, "attention", lambda *a: (right(*a)[0] * np.float32(1.01), *right(*a)[1:]))
    model = onnx.load(str(out / "model.onnx"))
    runner, plain = decoder(out, SegmentedSession(model, threads=1)), decoder(out, SegmentedSession(model, fuse=False))
    ids, mask = np.array([[5, 6, 7]]), np.ones((1, 3), np.int64)
    (logits, past), (expected, past_expected) = runner.run(ids, mask, None), plain.run(ids, mask, None)
    step = runner.run(np.array([[9]]), np.ones((1, 4), np.int64), past)[0]
    assert runner.session.fused_segment_count("attention") == 0 and runner.session.fused_segment_count() == 5
    assert caplog.text.count("native attention segment goes back to ONNX Runtime: ") == 2
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        step, plain.run(np.array([[9]]), np.ones((1, 4), np.int64), past_expected)[0], 1e-5, 1e-5
    )


def test_a_kernel_wrong_only_under_a_padding_mask_is_caught_by_the_drawn_inputs(sparse_cpu_export, monkeypatch, caplog):
    """A decode step's own mask hides nothing (no padding), so an attention kernel that ignores the mask in decode
    steps passes the check on the step's real inputs; the same check on random inputs (a random mask) catches it."""
    _checkpoint, out, _report = sparse_cpu_export
    right = fused_segment.native.attention

    def ignores_the_mask_in_decode(qkv, heads, cos, sin, past, mask, scales):
        return right(qkv, heads, cos, sin, past, np.ones_like(mask) if qkv.shape[1] == 1 else mask, scales)

    monkeypatch.setattr(fused_segment.native, "attention", ignores_the_mask_in_decode)
    runner = decoder(out, SegmentedSession(onnx.load(str(out / "model.onnx")), threads=1))
    _logits, past = runner.run(np.array([[5, 6, 7]]), np.ones((1, 3), np.int64), None)
    assert runner.session.fused_segment_count("attention") == 2  # the prefill checks pass
    runner.run(np.array([[9]]), np.ones((1, 4), np.int64), past)
    assert runner.session.fused_segment_count("attention") == 0
    assert caplog.text.count("goes back to ONNX Runtime: with random inputs: ") == 2
