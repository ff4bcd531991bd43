"""The sparse-cpu form of a graph: decoder MatMuls whose weights are mostly zeros become ``SparseLinear`` nodes
that carry their weight in sparsedeploy's compressed format (sparsedeploy.kernels.format) as initializers.

Linears that read the same tensor (q/k/v, gate/up) are fused into one node whose output a ``Split`` cuts back
into the original outputs, so the kernel reads the shared input once and is called once. Each node records the
original MatMul node names and output widths (attributes ``linears``, ``widths``), so the dense weights can be
recovered exactly (``unpacked``) and matched to the checkpoint by the export's zero-count check.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from sparsedeploy.kernels import format as packed_format

OP_TYPE = "SparseLinear"
DOMAIN = "ai.sparsedeploy"
MIN_SPARSITY = 0.25  # below this a weight stays a dense MatMul: the bitmask format reads more bytes than it saves


@dataclass(frozen=True)
class SparseLinearNode:
    """One SparseLinear node: input, output, packed weight [sum N, K] and the linears it stands for."""

    name: str
    input: str
    output: str
    weight: packed_format.PackedLinear
    linears: tuple[str, ...]  # the original MatMul node names, in output order
    widths: tuple[int, ...]  # their output features


def is_sparse_linear(node) -> bool:
    return node.op_type == OP_TYPE and node.domain == DOMAIN


def pack_linears(model, min_sparsity: float = MIN_SPARSITY) -> dict:
    """Rewrite `model` in place: every float32 MatMul with a 2-D initializer weight of at least `min_sparsity` zeros
    (used by that MatMul only) becomes a SparseLinear node; MatMuls on one input are fused. Returns a summary."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    groups: dict[str, list] = defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.input[1] not in inits:
            continue
        if uses[node.input[1]] != 1 or len(inits[node.input[1]].dims) != 2:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])  # [K, N]
        if weight.dtype == np.float32 and float((weight == 0).mean()) >= min_sparsity:
            groups[node.input[0]].append((node, weight))
    replaced: dict[str, list] = {}
    dropped: set[str] = set()
    packed_bytes = dense_bytes = 0
    for source, members in groups.items():
        first = members[0][0]
        name = f"{first.name.rsplit('/', 1)[0]}/SparseLinear" if len(members) > 1 else f"{first.name}/SparseLinear"
        weight = packed_format.pack(np.ascontiguousarray(np.concatenate([w.T for _, w in members], axis=0)))
        packed_bytes += weight.nbytes
        dense_bytes += weight.dense_nbytes
        arrays = weight.to_arrays()
        for key, array in arrays.items():
            graph.initializer.append(numpy_helper.from_array(array, f"{name}.{key}"))
        fused = len(members) > 1
        out = f"{name}_output_0" if fused else first.output[0]
        nodes = [
            helper.make_node(
                OP_TYPE,
                [source] + [f"{name}.{k}" for k in arrays],
                [out],
                name=name,
                domain=DOMAIN,
                arrays=list(arrays),
                linears=[n.name for n, _ in members],
                widths=[int(w.shape[1]) for _, w in members],
            )
        ]
        if fused:
            split = f"{name}.split"
            graph.initializer.append(
                numpy_helper.from_array(np.array([w.shape[1] for _, w in members], np.int64), split)
            )
            nodes.append(
                helper.make_node(
                    "Split", [out, split], [n.output[0] for n, _ in members], axis=-1, name=f"{name}/Split"
                )
            )
        replaced[first.name] = nodes
        dropped.update(n.name for n, _ in members)
    if groups:
        rewrite_nodes(model, replaced, dropped, {n.input[1] for members in groups.values() for n, _ in members})
    return {
        "nodes": len(groups),
        "linears": sum(len(m) for m in groups.values()),
        "min_sparsity": min_sparsity,
        "packed_bytes": int(packed_bytes),
        "dense_bytes": int(dense_bytes),
        "layout": packed_format.LAYOUT,
    }


def rewrite_nodes(model, replaced: dict[str, list], dropped: set[str], gone: set[str]) -> None:
    """Put each node named in `replaced` by its new nodes (in place, order kept), remove the other `dropped` nodes and
    the initializers named in `gone`, and import this domain."""
    from onnx import helper

    graph = model.graph
    kept = []
    for node in graph.node:
        if node.name in replaced:
            kept.extend(replaced[node.name])
        elif node.name not in dropped:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    keep = [i for i in graph.initializer if i.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def sparse_linear_nodes(model, arrays=None) -> list[SparseLinearNode]:
    """Every SparseLinear node of `model` with its packed weight (validated). `arrays(name)` reads an initializer
    (default: numpy_helper over the model's initializers)."""
    from onnx import helper, numpy_helper

    if arrays is None:
        inits = {i.name: i for i in model.graph.initializer}

        def arrays(name: str) -> np.ndarray:
            return numpy_helper.to_array(inits[name])

    found = []
    for node in model.graph.node:
        if not is_sparse_linear(node):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        try:
            keys = [k.decode() if isinstance(k, bytes) else k for k in attrs["arrays"]]
            weight = packed_format.PackedLinear.from_arrays({k: arrays(i) for k, i in zip(keys, node.input[1:])})
        except (KeyError, ValueError) as exc:
            raise ValueError(f"SparseLinear node {node.name}: {exc}") from None
        linears = tuple(s.decode() if isinstance(s, bytes) else s for s in attrs.get("linears", [node.name]))
        widths = tuple(int(w) for w in attrs.get("widths", [weight.shape[0]]))
        if sum(widths) != weight.shape[0] or len(widths) != len(linears):
            raise ValueError(
                f"SparseLinear node {node.name}: widths {widths} do not add up to {weight.shape[0]} outputs"
            )
        found.append(SparseLinearNode(node.name, node.input[0], node.output[0], weight, linears, widths))
    return found


def unpacked(node: SparseLinearNode) -> list[tuple[str, np.ndarray]]:
    """The original (MatMul node name, [K, N] weight) pairs of a SparseLinear node, bit-identical to what was packed."""
    dense = packed_format.unpack(node.weight)  # [sum N, K]
    bounds = np.cumsum((0,) + node.widths)
    return [(name, np.ascontiguousarray(dense[a:b].T)) for name, a, b in zip(node.linears, bounds[:-1], bounds[1:])]
