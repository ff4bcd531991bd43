"""The segments run by native code: the exporter's residual + RMSNorm and SiLU * up forms against ONNX Runtime,
what is refused, the first-run check, the run-time fallback, and the segmented session on a real export."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

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
    assert session.fused_segment_count == 3  # the 3 residual + RMSNorm segments; not the 2 SiLU * up ones
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
        step, _ = runner.run(logits[:, -1:].argmax(-1), np.ones((1, 5), np.int64), past)
        results.append((logits, step))
    # 2 layers: residual + RMSNorm after attention and after the MLP (but the last), SiLU * up: 5 segments
    assert fast.fused_segment_count == 5 and plain.fused_segment_count == 0
    assert fast.segment_count == plain.segment_count
    for a, b in zip(results[0], results[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_native_segments_pass_the_export_check_on_the_real_model(tmp_path, cache_dir):
    """smollm2-135m, Wanda 70 %, exported for sparse-cpu: the export's own check (every zero, logits within 1e-4 of
    PyTorch, 32 greedy tokens) runs through the native residual + RMSNorm and SiLU * up segments and the scaled-int8
    embedding lookup and lm_head, and passes (artifact <= 0.4x the dense weights), and
    greedy decoding gives the same tokens with and without them."""
    env = {**os.environ, "SPARSEDEPLOY_CACHE": str(cache_dir)}
    for args in (
        ["prune", "--model", "smollm2-135m", "--method", "wanda", "--sparsity", "70%", "--nsamples", "2"]
        + ["--seqlen", "64", "-o", str(tmp_path / "p")],
        ["export", "--model", str(tmp_path / "p"), "--target", "sparse-cpu", "-o", str(tmp_path / "x")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "sparsedeploy", "-q", *args], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "x" / "export_report.json").read_text())
    assert report["verification"]["ok"] and report["verification"]["parity"]["greedy_identical"]
    # the Q8_0 tied embedding / lm_head is stored once as scaled-int8, so the artifact is <= 0.4x the dense weights
    assert report["sparse_cpu"]["scaled_int8"]["weights"] == ["model.embed_tokens.weight"]
    dense = report["sparse_cpu"]["dense_bytes"] + report["sparse_cpu"]["scaled_int8"]["dense_bytes"]
    assert report["storage"]["model_bytes"] <= 0.4 * dense
    fast = OnnxDecoder.load(tmp_path / "x", threads=1)
    plain = dataclasses.replace(fast, session=SegmentedSession(onnx.load(fast.path), threads=1, fuse=False))
    prompt = np.array([[504, 3575, 282, 4649, 314]])  # "The capital of France is" in smollm2's vocabulary
    tokens = [decoder.greedy(prompt, 16).tolist() for decoder in (fast, plain)]
    # 60 residual + RMSNorm (the final one too: the int8 lm_head after it is a native step) and 30 SiLU * up
    assert fast.session.fused_segment_count == 90 and plain.session.fused_segment_count == 0
    assert fast.session.int8_node_count == 2
    assert tokens[0] == tokens[1]
