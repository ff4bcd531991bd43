"""Tracing an ONNX graph: where each MatMul/Gemm weight comes from (through Identity/Cast/Transpose chains,
Gemm/FusedMatMul ``transB``) as a [K, N] matrix, and its N:M layout along K; and whether its nodes multiply by a
large dense weight (how many threads ONNX Runtime gets beside sparsedeploy's kernels)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

# A dense weight this large (a dense lm_head: 262 MB in the 1B-like model) makes its MatMul a memory-bound GEMV worth
# ONNX Runtime's threads, where everything else ONNX Runtime runs beside sparsedeploy's kernels takes one.
LARGE_DENSE_WEIGHT_BYTES = 16 << 20


def multiplies_large_dense_weight(nodes, initializers) -> bool:
    """Whether a MatMul / Gemm among `nodes` reads one of `initializers` (TensorProtos; external data too) directly
    that holds more than LARGE_DENSE_WEIGHT_BYTES."""
    from sparsedeploy.onnx.dtypes import tensor_bytes

    large = {t.name for t in initializers if tensor_bytes(t) > LARGE_DENSE_WEIGHT_BYTES}
    return bool(large) and any(n.op_type in ("MatMul", "Gemm") and large.intersection(n.input) for n in nodes)


def ort_threads_beside_kernels(options, nodes, initializers, threads: int | None) -> None:
    """ONNX Runtime's intra-op threads for `nodes` (a whole graph, or a segmented session's segment) run beside
    sparsedeploy's kernels (on `threads`): one, since its pool would spin against the kernels' (2 threads, smollm2
    W70 decode: 0.94x dense with ONNX Runtime on 2 threads too, 1.75x on one; docs/sparse_cpu.md), unless they
    multiply by a large dense weight among `initializers` (a dense lm_head's memory-bound GEMV): then `threads`
    (None: ONNX Runtime's default), its pool not spinning (1B-like, 2 threads: a decode step 59.9 ms against
    66.3 ms with one whole, 57.4 against 61.0 ms segmented)."""
    if threads != 1 and multiplies_large_dense_weight(nodes, initializers):
        options.intra_op_num_threads = threads or 0
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        options.intra_op_num_threads = 1


# ---------------------------------------------------------------- locating weights in the graph


@dataclass
class OnnxWeight:
    """A constant matrix operand of a MatMul/Gemm, in the effective ``[K, N]`` layout."""

    node: str
    op: str
    source: str  # the initializer (or Constant node output) holding the data
    stored_shape: tuple[int, ...]
    transposed: bool  # stored as [N, K] (Transpose node, Gemm/FusedMatMul transB)
    matrix: np.ndarray = field(repr=False)  # [K, N]


class Graph:
    """Initializers, Constant nodes and producers of a ModelProto, for tracing constant operands."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        self.model = model
        self.numpy_helper = numpy_helper
        self.initializers = {init.name: init for init in model.graph.initializer}
        for sparse in model.graph.sparse_initializer:
            self.initializers[sparse.values.name] = sparse
        self.producer = {}
        self.constants = {}
        for node in model.graph.node:
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = attr.t
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            from onnx import SparseTensorProto

            proto = self.initializers.get(name, self.constants.get(name))
            if isinstance(proto, SparseTensorProto):
                dense = np.zeros(tuple(proto.dims), dtype=self.numpy_helper.to_array(proto.values).dtype)
                idx = self.numpy_helper.to_array(proto.indices)
                vals = self.numpy_helper.to_array(proto.values)
                if idx.ndim == 1:
                    dense.reshape(-1)[idx] = vals
                else:
                    dense[tuple(idx.T)] = vals
                self._arrays[name] = dense
            else:
                self._arrays[name] = self.numpy_helper.to_array(proto)
        return self._arrays[name]

    def trace_constant(self, name: str) -> tuple[str, np.ndarray, bool] | None:
        """Follow Identity/Cast/Transpose back to a constant; return (source, value as seen here, transposed)."""
        transposed = False
        chain = []
        current = name
        for _ in range(16):
            if current in self.initializers or current in self.constants:
                value = self.array(current)
                for op, perm in reversed(chain):
                    if op == "Transpose":
                        value = np.transpose(value, perm)
                return current, value, transposed
            node = self.producer.get(current)
            if node is None or node.op_type not in ("Identity", "Cast", "Transpose"):
                return None
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                chain.append(("Transpose", perm))
                transposed = not transposed
            current = node.input[0]
        return None

    def matmul_weights(self) -> list[OnnxWeight]:
        """Every constant 2-D right-hand operand of MatMul / Gemm / com.microsoft FusedMatMul, and every linear packed
        in a SparseLinear node (sparse-cpu), unpacked."""
        from sparsedeploy.kernels.scaled_int8 import unpack as unpack_int8
        from sparsedeploy.onnx.int8_nodes import LINEAR_OP as INT8_LINEAR
        from sparsedeploy.onnx.int8_nodes import int8_nodes
        from sparsedeploy.onnx.sparse_linear import sparse_linear_nodes, unpacked

        weights = []
        for sparse in sparse_linear_nodes(self.model, arrays=self.array):  # sparse-cpu: each packed linear, unpacked
            for name, matrix in unpacked(sparse):
                weights.append(OnnxWeight(name, "SparseLinear", sparse.name, sparse.weight.shape, False, matrix))
        for node in int8_nodes(self.model, arrays=self.array):  # sparse-cpu: a dense weight stored as scaled-int8
            if node.op_type == INT8_LINEAR:
                matrix = np.ascontiguousarray(unpack_int8(node.weight).T)  # [K, N], as the MatMul read it
                weights.append(OnnxWeight(node.nodes[0], INT8_LINEAR, node.name, node.weight.shape, True, matrix))
        for node in self.model.graph.node:
            if node.op_type not in ("MatMul", "Gemm", "FusedMatMul") or len(node.input) < 2:
                continue
            traced = self.trace_constant(node.input[1])
            if traced is None:
                continue
            source, value, transposed = traced
            if value.ndim != 2:
                continue
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            if trans_b:
                value, transposed = value.T, not transposed
            weights.append(
                OnnxWeight(
                    node.name or node.output[0],
                    node.op_type,
                    source,
                    tuple(self.array(source).shape),
                    transposed,
                    value,
                )
            )
        return weights


def fingerprint(matrix: np.ndarray) -> str:
    return f"{matrix.dtype}:{matrix.shape}:" + hashlib.sha1(np.ascontiguousarray(matrix).tobytes()).hexdigest()


def scope_key(name: str) -> str:
    return "." + name.replace("/", ".").strip(".") + "."
