"""Two small segments of a sparse-cpu graph run by sparsedeploy's native code instead of an ONNX Runtime call.

Between the SparseLinear nodes of a LLaMA-style decoder sit, per layer, two residual add + RMSNorm segments
(10 nodes, sometimes followed by Shape/Gather plumbing) and one SiLU(gate) * up segment (4 nodes). As their own
ONNX Runtime sessions they cost 40-125 us a call inside a decode step (~11 us when warm: the kernels' weight
stream evicts the session's state between calls); smollm2 has 89 of them a token. Here each is one C call
(`kernels.native.add_rmsnorm` / `silu_mul`). The same segments evaluated op by op with NumPy were slower than
ONNX Runtime (15-28 us against 11-12 us warm), so only these two exact forms are taken.

A segment is taken only when its nodes are exactly one of the two forms below, as torch.onnx writes them; the
first run is also done by ONNX Runtime and the outputs compared (``check_against``); a segment that disagrees
stays with ONNX Runtime for good (a warning says why). At run time, inputs of another shape or type than the form
expects (never seen from the exporter) go to ONNX Runtime too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sparsedeploy.kernels import native

ADD_RMSNORM = ["Add", "Cast", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Cast", "Mul"]
SILU_MUL = ["Split", "Sigmoid", "Mul", "Mul"]


class Unsupported(Exception):
    """The segment is not one of the two forms (the caller keeps ONNX Runtime)."""


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _scalar(const: dict, name: str) -> float | None:
    value = const.get(name)
    return float(value) if value is not None and value.size == 1 else None


def _other(node, known: str) -> str:
    """The input of a two-input node that is not `known` (raises if neither/both are)."""
    a, b = node.input
    if (a == known) == (b == known):
        raise Unsupported(f"{node.op_type} {node.name}: not wired as the form expects")
    return b if a == known else a


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise Unsupported(what)


def _is_float_cast(node) -> bool:
    from onnx import TensorProto

    return _attrs(node).get("to") == TensorProto.FLOAT


@dataclass
class FusedSegment:
    """One of the two forms: ``run(feeds) -> outputs`` (in the order of ``outputs``), ``fallback`` for other input."""

    kind: str
    outputs: list[str]
    run_native: Callable[[dict], list | None]
    fallback: Callable[[dict], list] | None = None

    def run(self, feeds: dict) -> list:
        got = self.run_native(feeds)
        return got if got is not None else self.fallback(feeds)

    @classmethod
    def build(cls, nodes: list, inputs: list[str], outputs: list[str], initializers: list) -> FusedSegment:
        from onnx import numpy_helper

        const = {t.name: numpy_helper.to_array(t) for t in initializers}
        ops = [n.op_type for n in nodes]
        if any(n.domain not in ("", "ai.onnx") for n in nodes):
            raise Unsupported("a node outside the standard domain")
        if ops[:10] == ADD_RMSNORM:
            return cls._add_rmsnorm(nodes, inputs, outputs, const)
        if ops == SILU_MUL:
            return cls._silu_mul(nodes, inputs, outputs, const)
        raise Unsupported(f"nodes {ops[:12]} are neither residual add + RMSNorm nor SiLU * up")

    @classmethod
    def _add_rmsnorm(cls, nodes, inputs, outputs, const) -> FusedSegment:
        add, cast, pow_, mean, add_eps, sqrt, div, mul, cast2, mul_w = nodes[:10]
        a, b = add.input
        _expect(a in inputs and b in inputs and a != b, "the residual Add does not add two segment inputs")
        s = add.output[0]
        _expect(cast.input[0] == s and _is_float_cast(cast), "Cast after the Add is not to float32")
        s32 = cast.output[0]
        _expect(pow_.input[0] == s32 and _scalar(const, pow_.input[1]) == 2.0, "Pow is not a square")
        axes = const.get(mean.input[1]) if len(mean.input) > 1 else None
        _expect(
            mean.input[0] == pow_.output[0]
            and axes is not None
            and np.atleast_1d(axes).tolist() == [-1]
            and _attrs(mean).get("keepdims", 1) == 1
            and not _attrs(mean).get("noop_with_empty_axes", 0),
            "ReduceMean is not over the last axis with keepdims",
        )
        eps = _scalar(const, _other(add_eps, mean.output[0]))
        _expect(eps is not None, "the epsilon is not a constant scalar")
        _expect(sqrt.input[0] == add_eps.output[0], "Sqrt does not take mean + eps")
        _expect(div.input[1] == sqrt.output[0] and _scalar(const, div.input[0]) == 1.0, "Div is not 1 / sqrt(...)")
        _expect(_other(mul, div.output[0]) == s32, "the normalising Mul does not scale the sum")
        _expect(cast2.input[0] == mul.output[0] and _is_float_cast(cast2), "the second Cast is not to float32")
        weight = const.get(_other(mul_w, cast2.output[0]))
        _expect(
            weight is not None and weight.dtype == np.float32 and weight.ndim == 1, "the norm weight is not float32 [H]"
        )
        out = mul_w.output[0]
        shapes: dict[str, str] = {}  # Shape output -> what it measures (all of these have the input's shape)
        same_shape = {s, s32, mul.output[0], cast2.output[0], out}
        gathers: dict[str, int] = {}
        for node in nodes[10:]:
            if node.op_type == "Shape" and node.input[0] in same_shape and not _attrs(node):
                shapes[node.output[0]] = node.input[0]
            elif node.op_type == "Gather" and node.input[0] in shapes and _attrs(node).get("axis", 0) == 0:
                index = const.get(node.input[1])
                _expect(index is not None and index.ndim == 0, "Gather of a shape by a computed index")
                gathers[node.output[0]] = int(index)
            else:
                raise Unsupported(f"{node.op_type} after the RMSNorm")
        allowed = {s, s32, out} | set(gathers)
        _expect(all(o in allowed for o in outputs), "the segment hands on an intermediate of the RMSNorm")
        h = weight.shape[0]
        eps32 = float(np.float32(eps))

        def run_native(feeds: dict) -> list | None:
            x, y = feeds[a], feeds[b]
            if x.dtype != np.float32 or y.dtype != np.float32 or x.shape != y.shape or x.shape[-1:] != (h,):
                return None
            total, normed = native.add_rmsnorm(x, y, weight, eps32)
            values = {s: total, s32: total, out: normed}
            for name, index in gathers.items():
                values[name] = np.array(x.shape[index], dtype=np.int64)
            return [values[o] for o in outputs]

        return cls("add_rmsnorm", list(outputs), run_native)

    @classmethod
    def _silu_mul(cls, nodes, inputs, outputs, const) -> FusedSegment:
        split, sigmoid, mul, mul_up = nodes
        _expect(split.input[0] in inputs and len(split.output) == 2, "Split does not cut a segment input in two")
        sizes = const.get(split.input[1]) if len(split.input) > 1 else None
        if sizes is None and "split" in _attrs(split):
            sizes = np.asarray(_attrs(split)["split"])
        _expect(sizes is not None and len(sizes) == 2 and sizes[0] == sizes[1], "Split is not into two equal halves")
        _expect(_attrs(split).get("axis", 0) == -1, "Split is not on the last axis")
        gate, up = split.output
        _expect(sigmoid.input[0] == gate, "Sigmoid does not take the gate")
        _expect(_other(mul, sigmoid.output[0]) == gate, "SiLU's Mul is not gate * sigmoid(gate)")
        _expect(_other(mul_up, mul.output[0]) == up, "the last Mul is not SiLU(gate) * up")
        _expect(outputs == [mul_up.output[0]], "the segment hands on an intermediate of SiLU * up")
        source, h = split.input[0], int(sizes[0])

        def run_native(feeds: dict) -> list | None:
            x = feeds[source]
            if x.dtype != np.float32 or x.shape[-1:] != (2 * h,):
                return None
            return [native.silu_mul(x)]

        return cls("silu_mul", list(outputs), run_native)

    def check_against(self, expected: list, got: list) -> str | None:
        """None if ``got`` matches ONNX Runtime's ``expected`` (float: within 1e-4 relative); else what differs."""
        for name, e, g in zip(self.outputs, expected, got, strict=True):
            e, g = np.asarray(e), np.asarray(g)
            if e.shape != g.shape or e.dtype != g.dtype:
                return f"{name}: {g.dtype}{list(g.shape)} against ONNX Runtime's {e.dtype}{list(e.shape)}"
            if e.dtype.kind == "f":
                scale = float(np.abs(e).max()) if e.size else 0.0
                if not np.allclose(g, e, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True):
                    return f"{name}: differs by up to {float(np.abs(g - e).max()):.3g} (scale {scale:.3g})"
            elif not np.array_equal(e, g):
                return f"{name}: {g.tolist()} against ONNX Runtime's {e.tolist()}"
        return None
