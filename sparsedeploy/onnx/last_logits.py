"""Logits of the last position only: what greedy generation reads.

An exported causal LM returns ``logits`` for every position ``[B, S, V]``; generation reads only the last one. Over a
64-token prompt the lm_head is then 64 rows of work for one row used (smollm2-135m's 49152 x 576 head: ~45 ms of a
~135 ms sparse-cpu prefill on one core; docs/bench.md). Serving runtimes compute the last row only (Hugging Face's
``logits_to_keep``; the DeepSparse runner here, runtimes/decoder_stack.py). This module makes an exported graph do the
same, for ONNX Runtime: a ``Slice`` of the last position in front of the lm_head, ``logits`` becoming ``[B, 1, V]``.
A sparse-cpu graph whose lm_head runs in sparsedeploy's kernels slices in the runtime instead (onnx/segmented.py).
"""

from __future__ import annotations

import numpy as np

from sparsedeploy.common.errors import UserError
from sparsedeploy.onnx.sparse_linear import DOMAIN

LOGITS = "logits"
LINEAR_OPS = ("MatMul",)  # a standard lm_head: hidden [B, S, D] @ weight [D, V]


class LastLogitsUnavailable(UserError):
    """The graph's ``logits`` do not come from an lm_head this module can cut (e.g. a soft-capped lm_head)."""


def logits_producer(model):
    """The node that computes ``logits`` (ValueError when the graph has none)."""
    node = next((n for n in model.graph.node if LOGITS in n.output), None)
    if node is None:
        raise ValueError(f"no node computes `{LOGITS}`: not a causal-LM graph")
    return node


def is_kernel_lm_head(node) -> bool:
    """Whether the lm_head is a node sparsedeploy's kernels run (SparseLinear / Int8Linear), sliced by the runtime."""
    return node.domain == DOMAIN


def cut_to_last_position(model, name: str, whole_graph: bool = False) -> None:
    """Edit `model` in place so that ``logits`` is the last position's: a Slice in front of a MatMul lm_head, or, for
    a kernel-run lm_head (the runtime multiplies the last row), only the declared shape. whole_graph: the graph runs
    whole in ONNX Runtime (the custom-op library runs its kernel nodes), so a kernel-run lm_head gets the Slice too.
    LastLogitsUnavailable, naming `name` and with the graph unchanged, when the lm_head is not one of these."""
    try:
        if is_kernel_lm_head(logits_producer(model)) and not whole_graph:
            set_last_position_shape(model)
        else:
            keep_last_position_logits(model)
    except ValueError as exc:
        raise LastLogitsUnavailable(f"{name}: {exc}") from None


def keep_last_position_logits(model) -> None:
    """Edit `model` in place: the lm_head multiplies the last position's hidden state only; ``logits`` is
    ``[batch, 1, vocab]``. ValueError, with the graph unchanged, when ``logits`` does not come from a MatMul of the
    hidden states by a weight initializer, or a kernel-run lm_head (SparseLinear / Int8Linear) whose other inputs are
    all weights (nothing else is edited blindly)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    head = logits_producer(model)
    standard = head.op_type in LINEAR_OPS and not head.domain and len(head.input) == 2
    if not (standard or is_kernel_lm_head(head)) or not all(_constant(model, i) for i in head.input[1:]):
        op = f"{head.domain}.{head.op_type}" if head.domain else head.op_type
        raise ValueError(
            f"`{LOGITS}` comes from a {op} node, not a MatMul of the hidden states by a weight: cannot compute the "
            "last position's logits alone"
        )
    hidden = head.input[0]
    sliced = f"{hidden}/last_position"
    bounds = [
        numpy_helper.from_array(np.array([value], np.int64), f"{sliced}/{what}")
        for what, value in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 1))
    ]
    graph.initializer.extend(bounds)
    index = list(graph.node).index(head)
    graph.node.insert(index, helper.make_node("Slice", [hidden, *(b.name for b in bounds)], [sliced], name=sliced))
    head.input[0] = sliced
    set_last_position_shape(model)


def _constant(model, name: str) -> bool:
    """Whether `name` is a weight: an initializer, or computed from initializers alone (a tied lm_head is the
    embedding through a Transpose node)."""
    weights = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    pending, seen = [name], set()
    while pending:
        value = pending.pop()
        if value in weights or value in seen:
            continue
        seen.add(value)
        node = producers.get(value)
        if node is None:  # a graph input
            return False
        pending.extend(i for i in node.input if i)
    return True


def set_last_position_shape(model) -> None:
    """Declare ``logits``' sequence axis as 1 (a graph output's declared shape must be what the run returns)."""
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if output.name == LOGITS and len(dims) == 3:
            dims[1].Clear()
            dims[1].dim_value = 1
