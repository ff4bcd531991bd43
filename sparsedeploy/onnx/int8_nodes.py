"""The sparse-cpu form's dense weights that are exactly int8 times a scale per 32 (kernels/scaled_int8.py).

After the SparseLinear rewrite, a float32 initializer that is read only by embedding lookups (``Gather`` on axis 0)
and by MatMuls (directly, or through ``Transpose`` perm [1, 0], which is how torch.onnx writes a tied lm_head) and
whose values have the scaled-int8 form bit for bit is stored once in that form and read by two custom-domain ops:
  Int8Gather (indices, q, scales, shape) -> the rows, float32, bit-identical to Gather's
  Int8Linear (x, q, scales, shape) -> x @ W.T (W the [N, K] packed matrix; the MatMul's weight transposed)
Each node records the original node names (attribute ``nodes``) so inspection and the export's checks can name the
weight it stands for. A weight that does not have the form bit for bit stays as it was.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from sparsedeploy.kernels import scaled_int8
from sparsedeploy.onnx.sparse_linear import DOMAIN, rewrite_nodes

GATHER_OP = "Int8Gather"
LINEAR_OP = "Int8Linear"


@dataclass(frozen=True)
class Int8Node:
    """One Int8Gather / Int8Linear node with its weight (the packed [N, K] matrix)."""

    name: str
    op_type: str
    input: str  # indices (Int8Gather) or x (Int8Linear)
    output: str
    weight: scaled_int8.ScaledInt8Linear
    nodes: tuple[str, ...]  # the original node names


def is_int8_node(node) -> bool:
    return node.domain == DOMAIN and node.op_type in (GATHER_OP, LINEAR_OP)


def _uses(graph) -> dict[str, list]:
    uses: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            uses[name].append(node)
    return uses


def _perm(node) -> list[int]:
    """A 2-D Transpose's perm (no attribute: the axes reversed, which torch.onnx writes for a tied lm_head)."""
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _node(original, op_type: str, first_input: str, arrays: list[str], source: str) -> list:
    """The Int8Gather / Int8Linear node standing for `original` (one node; a list, as the rewrite takes)."""
    from onnx import helper

    return [
        helper.make_node(
            op_type,
            [first_input, *arrays],
            [original.output[0]],
            name=f"{original.name}/{op_type}",
            domain=DOMAIN,
            nodes=[original.name],
            source=source,
        )
    ]


def pack_scaled_int8(model) -> dict:
    """Rewrite `model` in place (see the module doc). Returns a summary: weights packed, bytes before and after,
    and the weights that were candidates but not exactly int8 (they stay float32)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = _uses(graph)
    outputs = {o.name for o in graph.output}
    plans: list[tuple[str, list, list, list]] = []  # (initializer, its Gathers, (Transpose, MatMul)s, MatMuls)
    for name, init in inits.items():
        if len(init.dims) != 2 or init.data_type != 1 or name in outputs or not uses.get(name):  # 1: FLOAT
            continue
        gathers, linears, direct, ok = [], [], [], True
        for node in uses[name]:
            if (
                node.op_type == "Gather"
                and node.domain in ("", "ai.onnx")
                and node.input[0] == name
                and _axis(node) == 0
            ):
                gathers.append(node)
            elif node.op_type == "Transpose" and _perm(node) == [1, 0] and node.output[0] not in outputs:
                after = uses.get(node.output[0], [])
                if after and all(n.op_type == "MatMul" and n.input[1] == node.output[0] for n in after):
                    linears.extend((node, n) for n in after)
                else:
                    ok = False
            elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] == name:
                direct.append(node)
            else:
                ok = False
        if not ok or (direct and (gathers or linears)):
            continue  # one packed matrix per initializer: rows [N, K] for lookups/tied heads, or W.T for a MatMul
        plans.append((name, gathers, linears, direct))
    packed_bytes = dense_bytes = 0
    packed: list[str] = []
    not_exact: list[str] = []
    replace: dict[str, list] = {}
    drop: set[str] = set()
    for name, gathers, linears, direct in plans:
        value = numpy_helper.to_array(inits[name])
        matrix = np.ascontiguousarray(value.T) if direct else value
        weight = scaled_int8.pack(matrix)
        if weight is None:
            not_exact.append(name)
            continue
        packed.append(name)
        packed_bytes += weight.nbytes
        dense_bytes += weight.dense_nbytes
        arrays = []
        for key, array in weight.to_arrays().items():
            arrays.append(f"{name}.int8.{key}")
            graph.initializer.append(numpy_helper.from_array(array, arrays[-1]))

        for node in gathers:
            replace[node.name] = _node(node, GATHER_OP, node.input[1], arrays, name)
        for transpose, matmul in linears:
            drop.add(transpose.name)
            replace[matmul.name] = _node(matmul, LINEAR_OP, matmul.input[0], arrays, name)
        for matmul in direct:
            replace[matmul.name] = _node(matmul, LINEAR_OP, matmul.input[0], arrays, name)
    if packed:
        rewrite_nodes(model, replace, drop, set(packed))
    return {
        "weights": packed,
        "not_exact": not_exact,
        "packed_bytes": int(packed_bytes),
        "dense_bytes": int(dense_bytes),
        "layout": scaled_int8.LAYOUT,
    }


def int8_nodes(model, arrays=None) -> list[Int8Node]:
    """Every Int8Gather / Int8Linear node of `model` with its weight (validated). `arrays(name)` reads an
    initializer (default: numpy_helper over the model's initializers)."""
    from onnx import helper, numpy_helper

    if arrays is None:
        inits = {i.name: i for i in model.graph.initializer}

        def arrays(name: str) -> np.ndarray:
            return numpy_helper.to_array(inits[name])

    found, weights = [], {}
    for node in model.graph.node:
        if not is_int8_node(node):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        key = tuple(node.input[1:])
        try:
            if key not in weights:  # a tied embedding / lm_head: one weight, two nodes
                weights[key] = scaled_int8.ScaledInt8Linear.from_arrays(
                    {"q": arrays(node.input[1]), "scales": arrays(node.input[2]), "shape": arrays(node.input[3])}
                )
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{node.op_type} node {node.name}: {exc}") from None
        names = tuple(s.decode() if isinstance(s, bytes) else s for s in attrs.get("nodes", [node.name]))
        found.append(Int8Node(node.name, node.op_type, node.input[0], node.output[0], weights[key], names))
    return found
