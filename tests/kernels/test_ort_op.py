"""sparsedeploy's ONNX Runtime custom-op library (kernels/csrc/ort_op/, built by scripts/build_ort_op.sh): the
SparseLinear, Int8Linear and Int8Gather nodes of a sparse-cpu export run inside ONNX Runtime. Checked against NumPy
references, on bad weights (an error status, not a crash) and, on the real model, against PyTorch."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import REPO
from onnx import TensorProto, helper, numpy_helper

from sparsedeploy.common.errors import UserError
from sparsedeploy.kernels import native, scaled_int8
from sparsedeploy.kernels.format import pack as native_pack
from sparsedeploy.onnx.decoder import OnnxDecoder
from sparsedeploy.onnx.sparse_linear import DOMAIN, pack_linears
from sparsedeploy.onnx.storage import register_op_library
from sparsedeploy.onnx.verify import verify_parity


def session(model, library, threads=None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    register_op_library(options, library, threads)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def sparse_linear_model(w_kn: np.ndarray, rank: int):
    """x [..., K] @ w [K, N] as the export writes it: a MatMul rewritten into a SparseLinear node (pack_linears)."""
    k, n = w_kn.shape
    lead = ["b", "s"][: rank - 1]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, n])],
        [numpy_helper.from_array(w_kn, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    pack_linears(model, min_sparsity=0.0)
    assert [(n.op_type, n.domain) for n in model.graph.node] == [("SparseLinear", DOMAIN)]
    return model


def weight(k, n, sparsity, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.random((k, n)) < sparsity] = 0
    return w


WEIGHTS = {
    "70 %, K and N odd": weight(70, 45, 0.7, 0),
    "dense (0 %)": weight(33, 8, 0.0, 1),
    "99 %": weight(300, 21, 0.99, 2),
    "zero rows and columns": weight(64, 17, 0.5, 3) * (np.arange(17) % 3 != 0) * (np.arange(64) % 5 != 0)[:, None],
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("x_shape", [(1,), (7,), (300,), (0,), (2, 3)])  # 300: more than one 256-row kernel call
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_sparse_linear_node_matches_float64(ort_op_library, name, x_shape, threads):
    w = WEIGHTS[name].astype(np.float32)
    model = sparse_linear_model(w, len(x_shape) + 1)
    x = np.random.default_rng(len(x_shape)).standard_normal((*x_shape, w.shape[0])).astype(np.float32)
    (y,) = session(model, ort_op_library, threads).run(None, {"x": x})
    assert y.shape == (*x_shape, w.shape[1]) and y.dtype == np.float32
    ref = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_each_call_runs_in_the_form_the_python_runtime_picks(ort_op_library, sparsity):
    """The op and the Python binding both go by the library's form choice (pick_form): for every batch they give the
    same bits, over batches that run in different forms."""
    w = weight(2048, 96, sparsity, 4)  # K 2048: the forms' K blocks and the 8-lane loops' sums differ
    model = sparse_linear_model(w, 2)
    sess = session(model, ort_op_library, 1)
    packed = native_pack(np.ascontiguousarray(w.T))
    bound = native.BoundMatmul(packed, threads=1)
    forms = set()
    for b in (1, 2, 5, 8, 16, 33, 64, 97):
        x = np.random.default_rng(b).standard_normal((b, 2048)).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        assert np.array_equal(y, bound(x)), (b, bound.form_for(b))
        forms.add(bound.form_for(b))
    # several forms at 50 and 70 % on every x86 path (Zen 4 / AVX-512: all three, and bitmask and rows at 90 %); at
    # 90 % the 256-bit path takes the row form at every one of these batches (Zen 3)
    assert len(forms) >= 2 or (sparsity == 0.9 and native.best_isa() != "avx512")


def int8_weight(n, k, seed):
    """A Q8_0-like weight (int8 codes times an fp16 scale per 32) and its scaled-int8 form."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-127, 128, size=(n, k)).astype(np.float32)
    codes[:, ::32] = 127  # each run of 32 reaches the code range (Q8_0: scale = max |x| / 127)
    scales = rng.uniform(1e-3, 1e-1, size=(n, k // 32)).astype(np.float16).astype(np.float32)
    w = (codes.reshape(n, k // 32, 32) * scales[..., None]).reshape(n, k).astype(np.float32)
    p = scaled_int8.pack(w)
    assert p is not None
    return w, p


def int8_model(p, op, first, first_type, first_dims, out_dims):
    inits = [numpy_helper.from_array(np.ascontiguousarray(a), f"w.{key}") for key, a in p.to_arrays().items()]
    node = helper.make_node(op, [first, "w.q", "w.scales", "w.shape"], ["y"], name=op, domain=DOMAIN)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(first, first_type, first_dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def test_int8_nodes_equal_the_python_runtime(ort_op_library):
    n, k = 37, 96  # 10 row groups, the last partial
    w, p = int8_weight(n, k, 0)
    gather = session(int8_model(p, "Int8Gather", "ids", TensorProto.INT64, ["b", "s"], ["b", "s", k]), ort_op_library)
    ids = np.array([[0, 5, 36, -1], [-37, 4, 3, 2]], np.int64)
    (rows,) = gather.run(None, {"ids": ids})
    assert np.array_equal(rows.view(np.uint32), w[ids % n].view(np.uint32))  # the embedding rows, bit for bit
    linear = session(int8_model(p, "Int8Linear", "x", TensorProto.FLOAT, ["b", k], ["b", n]), ort_op_library, 2)
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    (y,) = linear.run(None, {"x": x})
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-4)
    with pytest.raises(Exception, match=r"Int8Gather: index 37 is out of range \[-37, 37\)"):
        gather.run(None, {"ids": np.array([[37]], np.int64)})


def with_initializer(model, name, array):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for init in model.graph.initializer:
        if init.name.endswith(name):
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    return model


def test_a_malformed_weight_is_an_error_naming_it_not_a_crash(ort_op_library):
    """Weights that do not fit their shape make ONNX Runtime raise an error naming the node's input (an error status
    from the kernel, not an exception through the C ABI, which would abort the process)."""
    w = WEIGHTS["70 %, K and N odd"]
    model = sparse_linear_model(w, 2)
    arrays = {i.name.rsplit(".", 1)[-1]: numpy_helper.to_array(i) for i in model.graph.initializer}
    block_ptr, values = arrays["block_ptr"], arrays["values"]
    x = np.ones((1, w.shape[0]), np.float32)
    short = session(with_initializer(model, ".block_ptr", block_ptr[:-1]), ort_op_library)
    with pytest.raises(Exception, match=r"SparseLinear: input `block_ptr` has \d+ elements"):
        short.run(None, {"x": x})
    truncated = session(with_initializer(model, ".values", values[: len(values) // 2]), ort_op_library)
    with pytest.raises(Exception, match=r"SparseLinear: block_ptr ends at \d+ but `values` holds"):
        truncated.run(None, {"x": x})
    shifted = block_ptr.copy()
    shifted[1] += 1  # block 0 claims one element more than its masks store
    corrupt = session(with_initializer(model, ".block_ptr", shifted), ort_op_library)
    with pytest.raises(Exception, match=r"SparseLinear: block 0 stores \d+ elements by its masks but \d+ by block_ptr"):
        corrupt.run(None, {"x": x})
    options = ort.SessionOptions()
    options.add_session_config_entry("sparsedeploy.threads", "0")
    with pytest.raises(UserError, match=r"`sparsedeploy.threads` must be a thread count >= 1, got '0'"):
        register_op_library(options, ort_op_library, None)


UNLOAD_CHILD = """
import gc, sys
import numpy as np, onnxruntime as ort
from sparsedeploy.onnx.storage import register_op_library
library, model, x, expected = sys.argv[1], sys.argv[2], np.load(sys.argv[3]), np.load(sys.argv[4])
for _ in range(20):
    options = ort.SessionOptions()
    register_op_library(options, library, 2)
    (y,) = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    del options  # with the session gone too, ONNX Runtime releases the library
    gc.collect()
    assert np.allclose(y, expected, rtol=1e-5, atol=1e-4)
    assert any(library in line for line in open("/proc/self/maps")), "the library was unloaded"
print("ok")
"""


def test_onnx_runtime_cannot_unload_the_library_under_its_kernel_threads(ort_op_library, tmp_path):
    """ONNX Runtime unloads a custom-op library when the session options that registered it go, but the library's
    kernel threads outlive the call (detached, spinning ~2 ms for the next one) inside its code: it is linked
    NODELETE. Without that, on a 16-core Intel Xeon (GCC 13) the first 2-thread run whose session was then dropped
    crashed the process (SIGSEGV in a kernel thread at an unmapped address); here GCC 12's unique symbols happened to
    pin it, so the flag itself is checked too."""
    dynamic = subprocess.run(["readelf", "-d", str(ort_op_library)], capture_output=True, text=True, check=True)
    assert re.search(r"FLAGS_1\b.*\bNODELETE\b", dynamic.stdout), dynamic.stdout
    w = WEIGHTS["70 %, K and N odd"].astype(np.float32)
    x = np.random.default_rng(0).standard_normal((7, w.shape[0])).astype(np.float32)
    onnx.save(sparse_linear_model(w, 2), tmp_path / "model.onnx")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", x.astype(np.float64) @ w.astype(np.float64))
    args = [str(ort_op_library)] + [str(tmp_path / f) for f in ("model.onnx", "x.npy", "expected.npy")]
    child = subprocess.run(
        [sys.executable, "-c", UNLOAD_CHILD, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0 and child.stdout.split() == ["ok"], child.stdout + child.stderr[-2000:]


@pytest.mark.slow
def test_the_real_model_runs_whole_in_onnx_runtime(ort_op_library, smollm_wanda70_sparse_cpu):
    """smollm2-135m, Wanda 70 %, its sparse-cpu export in one ONNX Runtime session with the library (SparseLinear
    incl. fused q/k/v and gate/up, the scaled-int8 embedding and lm_head): logits within 1e-4 of PyTorch over a
    prefill and 4 decode steps, 32 greedy tokens identical; the lm_head cut to the last position in the graph."""
    checkpoint, out = smollm_wanda70_sparse_cpu
    parity = verify_parity(checkpoint, out, custom_op_library=ort_op_library)
    assert parity.ok and parity.max_abs_diff <= 1e-4
    assert all(p["greedy_identical"] and len(p["torch_tokens"]) == 32 for p in parity.prompts)
    whole = OnnxDecoder.load(out, threads=1, last_logits=True, custom_op_library=ort_op_library)
    segmented = OnnxDecoder.load(out, threads=1, last_logits=True)
    assert isinstance(whole.session, ort.InferenceSession) and whole.last_logits
    assert {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node} >= {"SparseLinear", "Int8Gather"}
    prompt = np.array([[504, 3575, 282, 4649, 314]])  # "The capital of France is"
    logits, _ = whole.run(prompt, np.ones_like(prompt), None)
    assert logits.shape == (1, 1, 49152)
    assert whole.greedy(prompt, 16).tolist() == segmented.greedy(prompt, 16).tolist()
