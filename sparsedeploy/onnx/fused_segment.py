"""Segments of a sparse-cpu graph run by sparsedeploy's native code instead of an ONNX Runtime call.

Between the SparseLinear nodes of a LLaMA-style decoder sit, per layer, two residual add + RMSNorm segments
(10 nodes, sometimes followed by Shape/Gather plumbing), one SiLU(gate) * up segment (4 nodes) and one attention
segment (~121 nodes, most of them shape plumbing). As their own ONNX Runtime sessions the small ones cost 40-125 us
a call inside a decode step (~11 us when warm: the kernels' weight stream evicts the session's state between
calls), the attention ~350 us. Here each is one C call (`kernels.native.add_rmsnorm` / `silu_mul` / `attention`).
The same small segments evaluated op by op with NumPy were slower than ONNX Runtime (15-28 us against 11-12 us
warm), so only these exact forms are taken.

A norm or SiLU segment is taken only when its nodes are exactly that form, as torch.onnx writes it; the first run
is also done by ONNX Runtime and the outputs compared (``check_against``); a segment that disagrees stays with ONNX
Runtime for good (a warning says why). An attention segment's float dataflow is checked node by node and its shape
plumbing by value (``FusedSegment.checks``, ``_attention``). At run time, inputs of another shape or type than the
form expects (never seen from the exporter) go to ONNX Runtime too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sparsedeploy.kernels import native
from sparsedeploy.onnx.dtypes import tensor_bytes

log = logging.getLogger(__name__)

INLINE_BYTES = 1 << 20  # initializers above this: not read by the forms, handed to ONNX Runtime as arrays (segmented)

ADD_RMSNORM = ["Add", "Cast", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Cast", "Mul"]
SILU_MUL = ["Split", "Sigmoid", "Mul", "Mul"]


class Unsupported(Exception):
    """The segment is not one of the two forms (the caller keeps ONNX Runtime)."""


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _scalar(const: dict, name: str) -> float | None:
    value = const.get(name)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


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
    """One of the forms: ``run(feeds) -> outputs`` (in the order of ``outputs``), ``fallback`` for other input.

    ``checks``: for the attention form, which kind of call a feed is (prefill or decode step, with or without a cache);
    the first call of each kind runs in both and is compared, plus once with its float inputs and mask drawn at
    random (``perturb``), and one that disagrees sends the segment back to ONNX Runtime for good.
    """

    kind: str
    outputs: list[str]
    run_native: Callable[[dict], list | None]
    fallback: Callable[[dict], list] | None = None
    checks: Callable[[dict], object] | None = None
    perturb: Callable[[dict], dict] | None = None
    checked: set = field(default_factory=set)
    refused: str = ""

    def run(self, feeds: dict) -> list:
        if self.refused:
            return self.fallback(feeds)
        if self.checks is not None and self.checks(feeds) not in self.checked:
            return self.first_of_kind(feeds)
        got = self.run_native(feeds)
        return got if got is not None else self.fallback(feeds)

    def first_of_kind(self, feeds: dict, expected: list | None = None) -> list:
        """Run a call of a kind not checked yet in both and compare; `expected`: ONNX Runtime's outputs, if run."""
        expected = self.fallback(feeds) if expected is None else expected
        got = self.run_native(feeds)
        if got is None:
            return expected
        differs = self.check_against(expected, got)
        if not differs and self.perturb is not None:
            drawn = self.perturb(feeds)
            got = self.run_native(drawn)
            differs = "random inputs it does not take" if got is None else self.check_against(self.fallback(drawn), got)
            differs = differs and f"with random inputs: {differs}"
        if differs:
            self.refused = differs
            log.warning("native %s segment goes back to ONNX Runtime: %s", self.kind, differs)
        else:
            self.checked.add(self.checks(feeds))
        return expected

    @classmethod
    def build(cls, nodes: list, inputs: list[str], outputs: list[str], initializers: list) -> FusedSegment:
        from onnx import numpy_helper

        # the forms read scalars and norm weights only: a large initializer (an embedding) is not converted
        const = {t.name: numpy_helper.to_array(t) for t in initializers if tensor_bytes(t) <= INLINE_BYTES}
        ops = [n.op_type for n in nodes]
        if any(n.domain not in ("", "ai.onnx") for n in nodes):
            raise Unsupported("a node outside the standard domain")
        if ops[:10] == ADD_RMSNORM:
            return cls._add_rmsnorm(nodes, inputs, outputs, const)
        if ops == SILU_MUL:
            return cls._silu_mul(nodes, inputs, outputs, const)
        if ops.count("Softmax") == 1 and ops.count("Split") == 1:
            return _attention(nodes, inputs, outputs, const)
        raise Unsupported(f"nodes {ops[:12]} are neither residual add + RMSNorm, SiLU * up nor attention")

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


class _Walk:
    """Who makes each value of a segment: the attention form is checked by walking back from its Softmax."""

    def __init__(self, nodes: list, inputs: list[str], const: dict) -> None:
        self.made = {o: n for n in nodes for o in n.output if o}
        self.inputs = set(inputs)
        self.const = const

    def node(self, value: str, op: str, what: str):
        n = self.made.get(value)
        _expect(n is not None and n.op_type == op, f"{what} is not made by a {op}")
        return n

    def ints(self, value: str) -> list | None:
        c = self.const.get(value)
        return None if c is None or c.dtype.kind not in "iu" else np.atleast_1d(c).tolist()

    def pair(self, node, op: str, what: str):
        """(the input made by `op`, the other input) of a two-input node."""
        for mine, other in (node.input, node.input[::-1]):
            made = self.made.get(mine)
            if made is not None and made.op_type == op:
                return made, other
        raise Unsupported(f"{what}: neither input of {node.op_type} {node.name} is made by a {op}")

    def scaled(self, node, what: str) -> tuple[str, float]:
        """(tensor, factor) of a Mul by a constant scalar."""
        for value, factor in (node.input, node.input[::-1]):
            scalar = _scalar(self.const, factor)
            if scalar is not None and value not in self.const:
                return value, scalar
        raise Unsupported(f"{what} is not a product with a constant scalar")

    def heads(self, value: str, source: str, what: str) -> tuple[int, list[str]]:
        """[B, S, H d] -> [B, H, S, d] of `source`: (d, the values the [B, S, -1, d] target takes B and S from)."""
        t = self.node(value, "Transpose", what)
        _expect(_attrs(t).get("perm") == [0, 2, 1, 3], f"{what}: the Transpose is not [0, 2, 1, 3]")
        r = self.node(t.input[0], "Reshape", what)
        _expect(r.input[0] == source, f"{what} does not reshape its part of the Split")
        target = self.node(r.input[1], "Concat", f"{what}: the Reshape target")
        _expect(len(target.input) == 4 and self.ints(target.input[2]) == [-1], f"{what}: target is not [B, S, -1, d]")
        d = self.ints(target.input[3])
        _expect(d is not None and len(d) == 1 and d[0] > 0, f"{what}: the head width is not a constant")
        return d[0], self.batch_seq(target.input[:2], what)

    def batch_seq(self, values, what: str) -> list[str]:
        """The segment inputs two Unsqueeze'd scalars come from (checked against B and S at run time)."""
        names = []
        for value in values:
            u = self.node(value, "Unsqueeze", f"{what}: a target dimension")
            _expect(u.input[0] in self.inputs and self.ints(u.input[1]) == [0], f"{what}: a dimension is not an input")
            names.append(u.input[0])
        return names

    def rotary(self, value: str, what: str) -> tuple[str, str, str]:
        """x cos + [-x[d/2:], x[:d/2]] sin: (x, cos, sin)."""
        add = self.node(value, "Add", what)
        muls = [self.node(v, "Mul", what) for v in add.input]
        turned = [m for m in muls if any(getattr(self.made.get(v), "op_type", "") == "Concat" for v in m.input)]
        _expect(len(turned) == 1, f"{what}: not one product with a rotate-half Concat")
        plain_mul = muls[1 - muls.index(turned[0])]
        concat, sin = self.pair(turned[0], "Concat", what)
        _expect(len(concat.input) == 2 and _attrs(concat).get("axis") in (-1, 3), f"{what}: rotate-half Concat axis")
        neg = self.node(concat.input[0], "Neg", what)
        high = self.node(neg.input[0], "Slice", what)
        low = self.node(concat.input[1], "Slice", what)
        x = low.input[0]
        _expect(high.input[0] == x, f"{what}: the halves come from two tensors")
        for s in (low, high):
            _expect(
                self.ints(s.input[3]) == [3] and (len(s.input) < 5 or self.ints(s.input[4]) == [1]),
                f"{what}: a half is not sliced on the last axis",
            )
        _expect(self.ints(low.input[1]) == [0] and self.half(low.input[2], x), f"{what}: the low half is not [:d/2]")
        end = self.ints(high.input[2])
        _expect(self.half(high.input[1], x) and end is not None and end[0] >= 2**62, f"{what}: high half is not [d/2:]")
        cos = _other(plain_mul, x)
        return x, cos, sin

    def half(self, value: str, x: str) -> bool:
        """Whether `value` is [x.shape[3] // 2] as torch.onnx writes it (Unsqueeze, Cast, Cast, Div, Gather, Shape)."""
        n = self.made.get(value)
        if n is None or n.op_type != "Unsqueeze" or self.ints(n.input[1]) != [0]:
            return False
        n = self.made.get(n.input[0])
        while n is not None and n.op_type == "Cast":
            n = self.made.get(n.input[0])
        if n is None or n.op_type != "Div" or self.ints(n.input[1]) != [2]:
            return False
        return self.dim(n.input[0]) == (x, 3)

    def dim(self, value: str) -> tuple[str, int] | None:
        """(t, i) if `value` is Gather(Shape(t), i), possibly Unsqueeze'd to [1]."""
        n = self.made.get(value)
        if n is not None and n.op_type == "Unsqueeze" and self.ints(n.input[1]) == [0]:
            n = self.made.get(n.input[0])
        if n is None or n.op_type != "Gather" or _attrs(n).get("axis", 0) != 0:
            return None
        shape, index = self.made.get(n.input[0]), self.ints(n.input[1])
        if shape is None or shape.op_type != "Shape" or _attrs(shape) or index is None or len(index) != 1:
            return None
        return shape.input[0], index[0]

    def repeated(self, value: str, what: str) -> str:
        """The tensor a repeat of kv heads (Unsqueeze at 2, Expand, Reshape) starts from (the count: by value)."""
        r = self.node(value, "Reshape", what)
        e = self.node(r.input[0], "Expand", what)
        u = self.node(e.input[0], "Unsqueeze", what)
        _expect(self.ints(u.input[1]) == [2], f"{what}: the heads are not repeated on a new axis 2")
        return u.input[0]

    def cache(self, value: str, what: str) -> tuple[str, str, str]:
        """present = Concat(past, new) on the sequence axis: (past, new, present)."""
        c = self.node(value, "Concat", what)
        _expect(len(c.input) == 2 and _attrs(c).get("axis") in (-2, 2), f"{what}: not a Concat on the sequence axis")
        _expect(c.input[0] in self.inputs, f"{what}: the past is not a segment input")
        return c.input[0], c.input[1], value

    def source(self, value: str, what: str) -> tuple[str, list[tuple[str, list[int]]]]:
        """The segment input `value` is Unsqueeze'd from, and the steps ((value, axes), first step first)."""
        steps = []
        while value not in self.inputs:
            u = self.node(value, "Unsqueeze", what)
            axes = self.ints(u.input[1])
            _expect(axes is not None, f"{what}: Unsqueeze by computed axes")
            steps.append((value, axes))
            value = u.input[0]
        return value, steps[::-1]


def _attention(nodes: list, inputs: list[str], outputs: list[str], const: dict) -> FusedSegment:
    """The attention between the fused q/k/v projection and o_proj, as torch.onnx writes a LLaMA-style layer with a
    KV cache: Split into q, k, v; [B, S, H d] -> [B, H, S, d]; rotary (half rotation) on q and k; present = Concat(past,
    new); kv heads repeated; softmax((q cq)(k^T ck) + Where(mask[..., :L], 0, -inf)) with NaN rows zeroed; times v;
    back to [B, S, hq d]. The float dataflow is checked here node by node; the shape plumbing in between (the
    Reshape / Expand targets) by value, on the first call of each kind (FusedSegment.checks)."""
    w = _Walk(nodes, inputs, const)
    split = next(n for n in nodes if n.op_type == "Split")
    softmax = next(n for n in nodes if n.op_type == "Softmax")
    qkv = split.input[0]
    sizes = w.ints(split.input[1]) if len(split.input) > 1 else None
    _expect(qkv in inputs and len(split.output) == 3 and _attrs(split).get("axis") == -1, "Split is not q, k, v")
    _expect(sizes is not None and len(sizes) == 3 and sizes[1] == sizes[2], "Split sizes are not [q, kv, kv]")
    _expect(_attrs(softmax).get("axis", -1) == -1, "Softmax is not over the last axis")
    scores, bias = w.pair(w.node(softmax.input[0], "Add", "the softmax input"), "MatMul", "the scores")
    where = w.node(bias, "Where", "the mask term")
    _expect(
        _scalar(const, where.input[1]) == 0.0 and _scalar(const, where.input[2]) == -np.inf,
        "the mask term is not Where(mask, 0, -inf)",
    )
    cut = w.node(where.input[0], "Slice", "the mask")
    mask = cut.input[0]
    _expect(mask in inputs and w.ints(cut.input[1]) == [0] and w.ints(cut.input[3]) == [3], "mask is not [..., :L]")
    q_scaled, k_scaled = scores.input
    q_rot, q_factor = w.scaled(w.node(q_scaled, "Mul", "the query side"), "the query side")
    k_turned, k_factor = w.scaled(w.node(k_scaled, "Mul", "the key side"), "the key side")
    k_t = w.node(k_turned, "Transpose", "the key side")
    _expect(_attrs(k_t).get("perm") == [0, 1, 3, 2], "the keys are not transposed [0, 1, 3, 2]")
    _expect(w.dim(cut.input[2]) == (k_t.input[0], 2), "the mask is not cut at the key count")
    past_k, k_rot, present_k = w.cache(w.repeated(k_t.input[0], "the keys"), "the key cache")
    products = [n for n in nodes if n.op_type == "MatMul"]
    _expect(len(products) == 2, f"{len(products)} MatMul nodes, not the scores and the weighted sum")
    probs = products[1 - products.index(scores)]
    zeroed = w.node(probs.input[0], "Where", "the probabilities")
    isnan = w.node(zeroed.input[0], "IsNaN", "the probabilities")
    _expect(
        isnan.input[0] == softmax.output[0]
        and zeroed.input[2] == softmax.output[0]
        and _scalar(const, zeroed.input[1]) == 0.0,
        "the probabilities are not Where(IsNaN(softmax), 0, softmax)",
    )
    past_v, v_new, present_v = w.cache(w.repeated(probs.input[1], "the values"), "the value cache")
    q_x, q_cos, q_sin = w.rotary(q_rot, "the query rotary")
    k_x, k_cos, k_sin = w.rotary(k_rot, "the key rotary")
    _expect((q_cos, q_sin) == (k_cos, k_sin), "q and k are turned by different cos / sin")
    d, dims = w.heads(q_x, split.output[0], "q")
    for value, part, what in ((k_x, split.output[1], "k"), (v_new, split.output[2], "v")):
        width, more = w.heads(value, part, what)
        _expect(width == d, f"{what} heads are {width} wide, q heads {d}")
        dims += more
    _expect(sizes[0] % d == 0 and sizes[1] % d == 0 and sizes[0] % sizes[1] == 0, "head counts do not divide")
    heads = (sizes[0] // d, sizes[1] // d)
    back = [n for n in nodes if n.op_type == "Transpose" and n.input[0] == probs.output[0]]
    _expect(len(back) == 1 and _attrs(back[0]).get("perm") == [0, 2, 1, 3], "the output is not transposed back")
    merged = [n for n in nodes if n.op_type == "Reshape" and n.input[0] == back[0].output[0]]
    _expect(len(merged) == 1, "the output is not reshaped to [B, S, -1]")
    target = w.node(merged[0].input[1], "Concat", "the output Reshape target")
    _expect(len(target.input) == 3 and w.ints(target.input[2]) == [-1], "the output target is not [B, S, -1]")
    dims += w.batch_seq(target.input[:2], "the output")
    out = merged[0].output[0]
    cos_in, cos_steps = w.source(q_cos, "rotary cos")
    sin_in, sin_steps = w.source(q_sin, "rotary sin")
    views = {value for value, _ in cos_steps + sin_steps}
    _expect(
        all(o in {present_k, present_v, out} | views for o in outputs) and out in outputs,
        "the segment hands on an intermediate of the attention",
    )
    checked_dims = tuple(dict.fromkeys((name, i % 2) for i, name in enumerate(dims)))  # the targets repeat B and S
    form = _AttentionForm(
        qkv,
        mask,
        (past_k, past_v),
        (cos_in, cos_steps),
        (sin_in, sin_steps),
        checked_dims,
        heads,
        d,
        (q_factor, k_factor),
    )
    names = (out, present_k, present_v)
    return FusedSegment("attention", list(outputs), form.runner(names, outputs), checks=form.kind, perturb=form.drawn)


@dataclass(frozen=True)
class _AttentionForm:
    """What the attention segment reads: input names, the rotary inputs' Unsqueeze steps, head counts and scales."""

    qkv: str
    mask: str
    past: tuple[str, str]
    cos: tuple[str, list]
    sin: tuple[str, list]
    dims: tuple[tuple[str, int], ...]  # (input, 0 or 1): that scalar must be B (0) or S (1); each pair once
    heads: tuple[int, int]
    d: int
    scales: tuple[float, float]

    def kind(self, feeds: dict) -> tuple:
        """The kind of call: (one new token, a cache to extend)."""
        return feeds[self.qkv].shape[1:2] == (1,), feeds[self.past[0]].shape[2:3] != (0,)

    def drawn(self, feeds: dict) -> dict:
        """The feeds with q, k, v, the past and the mask drawn at random (the same shapes)."""
        rng = np.random.default_rng(len(feeds[self.qkv].shape) + feeds[self.qkv].size)
        drawn = dict(feeds)
        for name in (self.qkv, *self.past):
            drawn[name] = rng.standard_normal(feeds[name].shape).astype(np.float32)
        drawn[self.mask] = rng.random(feeds[self.mask].shape) < 0.7
        return drawn

    def runner(self, names: tuple[str, str, str], outputs: list[str]) -> Callable[[dict], list | None]:
        width = (self.heads[0] + 2 * self.heads[1]) * self.d

        def unsqueezed(feeds: dict, source: tuple[str, list], values: dict) -> np.ndarray:
            name, steps = source
            x = feeds[name]
            for value, axes in steps:
                x = np.expand_dims(x, tuple(axes))
                values[value] = x
            return x

        def run_native(feeds: dict) -> list | None:
            qkv, mask, past_k, past_v = feeds[self.qkv], feeds[self.mask], feeds[self.past[0]], feeds[self.past[1]]
            if qkv.dtype != np.float32 or qkv.ndim != 3 or qkv.shape[2] != width or mask.dtype != np.bool_:
                return None
            b, s = qkv.shape[:2]
            if any(int(feeds[name]) != (b, s)[axis] for name, axis in self.dims):
                return None
            if past_k.dtype != np.float32 or past_k.ndim != 4 or mask.ndim != 4 or mask.shape[1] != 1:
                return None
            values: dict = {}
            cos, sin = unsqueezed(feeds, self.cos, values), unsqueezed(feeds, self.sin, values)
            if cos.ndim != 4 or sin.ndim != 4 or cos.shape[1] != 1 or sin.shape[1] != 1:
                return None
            try:
                out, present_k, present_v = native.attention(
                    qkv, self.heads, cos[:, 0], sin[:, 0], (past_k, past_v), mask[:, 0], self.scales
                )
            except ValueError:  # shapes the kernel does not take: ONNX Runtime runs the call
                return None
            values.update(zip(names, (out, present_k, present_v)))
            return [values[o] for o in outputs]

        return run_native
