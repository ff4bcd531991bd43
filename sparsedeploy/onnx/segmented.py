"""Running a sparse-cpu graph: ONNX Runtime runs every standard operator, sparsedeploy's kernels run each
SparseLinear node (and each Int8Linear / Int8Gather node: onnx/int8_nodes.py) between them.

The graph is cut at those nodes into segments of standard nodes; each segment becomes its own ONNX
Runtime session (built on first use, typed from the values it is fed), except the residual add + RMSNorm and
SiLU * up segments, which run as one native call each once their first run agrees with that session, and the
attention segments, checked on the first call of each kind (onnx/fused_segment.py). A run walks the steps in
order, passing NumPy arrays from one to the next, so the artifact needs nothing but ONNX Runtime and the compiled
library.
Why not one ORT session with a custom op: the onnxruntime-extensions Python-op bridge (the only custom-op route
installable here) copies every output element through Python, ~0.16 us each (docs/sparse_cpu.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from sparsedeploy.common.errors import UserError
from sparsedeploy.kernels import native
from sparsedeploy.onnx.dtypes import ort_type_name, tensor_bytes
from sparsedeploy.onnx.fused_segment import INLINE_BYTES, FusedSegment, Unsupported
from sparsedeploy.onnx.graph import ort_threads_beside_kernels
from sparsedeploy.onnx.int8_nodes import GATHER_OP as INT8_GATHER
from sparsedeploy.onnx.int8_nodes import int8_nodes, is_int8_node
from sparsedeploy.onnx.last_logits import LOGITS, cut_to_last_position
from sparsedeploy.onnx.sparse_linear import OP_TYPE, is_sparse_linear, sparse_linear_nodes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueInfo:
    """What ``InferenceSession.get_inputs()`` items give: name, shape (ints or dim names), type string."""

    name: str
    shape: list
    type: str


@dataclass
class _Segment:
    nodes: list
    inputs: list[str]
    outputs: list[str]
    initializers: list
    session: object = None  # the ONNX Runtime session (built on first use)
    run: object = None  # what runs it, chosen on first use: feeds dict -> outputs list
    native: FusedSegment | None = None  # the native form that runs it, if any


@dataclass
class _KernelStep:
    """A node run by sparsedeploy's code: SparseLinear, Int8Linear (x [..., K] -> [..., N]) or Int8Gather."""

    input: str
    output: str
    op_type: str
    run: object  # the array in -> the array out


def _matmul_step(bound, last_position: bool = False):
    """x [..., K] -> [..., N] through a bound kernel call ([B, K] -> [B, N], the checks done once); `last_position`:
    x [B, S, K] -> [B, 1, N], the last position's row only (the lm_head when only the last logits are wanted)."""

    def run(x: np.ndarray) -> np.ndarray:
        if last_position and x.ndim == 3:  # [B, S, K]: the sequence axis is 1
            x = x[:, -1:]
        y = bound(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, bound.k))
        return y.reshape(*x.shape[:-1], bound.n)

    return run


def _stub(tensor):
    """A data-less copy of an initializer (name, type, dims, an external-data reference) that ONNX Runtime's
    ``add_external_initializers`` fills in; shape inference reads the dims only."""
    from onnx import TensorProto

    stub = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    stub.data_location = TensorProto.EXTERNAL
    for key, value in (("location", f"{tensor.name}.bin"), ("offset", "0"), ("length", str(tensor_bytes(tensor)))):
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    return stub


def _value_info(proto) -> ValueInfo:
    tensor = proto.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
    return ValueInfo(proto.name, shape, ort_type_name(tensor.elem_type))


class SegmentedSession:
    """An InferenceSession look-alike (get_inputs, get_outputs, run) over a graph with SparseLinear nodes."""

    def __init__(
        self,
        model,
        threads: int | None = None,
        optimization_level=None,
        name: str = "model",
        fuse: bool = True,
        last_logits: bool = False,
    ) -> None:
        from onnx import TensorProto

        self.threads = threads or native.default_threads()
        self.fuse = fuse  # False: every segment runs in ONNX Runtime (comparisons, tests)
        # last_logits: `logits` for the last position only ([B, 1, V], onnx/last_logits.py). A kernel-run lm_head gets
        # the last position's row; a MatMul lm_head (run by ONNX Runtime) a Slice in front of it (edited in place).
        self.last_logits = last_logits
        if last_logits:
            cut_to_last_position(model, name)
        self.optimization_level = optimization_level
        self.name = name
        graph = model.graph
        self.opset_import = list(model.opset_import)
        self.ir_version = model.ir_version
        self._inputs = [_value_info(i) for i in graph.input]
        self._outputs = [_value_info(o) for o in graph.output]
        try:
            linears = {n.name: n for n in sparse_linear_nodes(model)}
            int8 = {n.name: n for n in int8_nodes(model)}
        except ValueError as exc:  # a packed weight that does not add up
            raise UserError(
                f"cannot read {name}'s packed weights: {exc}; the export is corrupt, export it again"
            ) from None
        inits = {i.name: i for i in graph.initializer}
        nodes = []
        # Constant nodes, and Identity nodes of an initializer (torch.onnx writes one weight shared by several
        # modules, e.g. equal norm weights, that way), become initializers: no segment depends on another for them
        for node in graph.node:
            source = None
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                source = node.attribute[0].t
            elif node.op_type == "Identity" and node.input[0] in inits:
                source = inits[node.input[0]]
            if source is not None:
                tensor = TensorProto()
                tensor.CopyFrom(source)
                tensor.name = node.output[0]
                inits[tensor.name] = tensor
            else:
                nodes.append(node)
        raw: list = []
        for node in nodes:
            if is_sparse_linear(node):
                sl = linears[node.name]
                bound = native.BoundMatmul(sl.weight, self.threads)
                raw.append(
                    _KernelStep(
                        sl.input, sl.output, node.op_type, _matmul_step(bound, self.last_logits and sl.output == LOGITS)
                    )
                )
            elif is_int8_node(node):
                i8 = int8[node.name]
                if i8.op_type == INT8_GATHER:
                    raw.append(_KernelStep(i8.input, i8.output, i8.op_type, i8.weight.rows))
                else:
                    bound = native.BoundInt8Matmul(i8.weight, self.threads)
                    raw.append(
                        _KernelStep(
                            i8.input,
                            i8.output,
                            i8.op_type,
                            _matmul_step(bound, self.last_logits and i8.output == LOGITS),
                        )
                    )
            elif raw and isinstance(raw[-1], list):
                raw[-1].append(node)
            else:
                raw.append([node])
        needed_after: list[set[str]] = []
        later = {o.name for o in graph.output}
        for step in reversed(raw):
            needed_after.append(set(later))
            later |= {step.input} if isinstance(step, _KernelStep) else {i for n in step for i in n.input if i}
        needed_after.reverse()
        self.steps: list = []
        for step, after in zip(raw, needed_after):
            if isinstance(step, _KernelStep):
                self.steps.append(step)
                continue
            produced = {o for n in step for o in n.output if o}
            used = list(dict.fromkeys(i for n in step for i in n.input if i))
            self.steps.append(
                _Segment(
                    nodes=step,
                    inputs=[i for i in used if i not in produced and i not in inits],
                    outputs=[o for n in step for o in n.output if o and o in after],
                    initializers=[inits[i] for i in used if i in inits],
                )
            )
        last_use: dict[str, int] = {}
        for index, step in enumerate(self.steps):
            for value in [step.input] if isinstance(step, _KernelStep) else step.inputs:
                last_use[value] = index
        keep = {o.name for o in graph.output}
        self._drop = [[] for _ in self.steps]  # values no later step reads: freed as soon as they are used
        for value, index in last_use.items():
            if value not in keep:
                self._drop[index].append(value)
        log.info(
            "%s: %d SparseLinear nodes between %d ONNX Runtime segments, %d kernel thread(s)",
            name,
            len(linears),
            sum(isinstance(s, _Segment) for s in self.steps),
            self.threads,
        )

    @property
    def linear_count(self) -> int:
        """SparseLinear nodes (the packed sparse linears)."""
        return sum(isinstance(s, _KernelStep) and s.op_type == OP_TYPE for s in self.steps)

    @property
    def int8_node_count(self) -> int:
        """Int8Gather / Int8Linear nodes (dense weights stored as scaled-int8)."""
        return sum(isinstance(s, _KernelStep) and s.op_type != OP_TYPE for s in self.steps)

    @property
    def segment_count(self) -> int:
        return sum(isinstance(s, _Segment) for s in self.steps)

    def get_inputs(self) -> list[ValueInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[ValueInfo]:
        return list(self._outputs)

    def _session(self, segment: _Segment, index: int, env: dict):
        import onnx
        import onnxruntime as ort
        from onnx import helper, numpy_helper

        inputs = [
            helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(env[i].dtype), None)
            for i in segment.inputs
        ]
        outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in segment.outputs]
        # Large initializers (an embedding or dense lm_head: 262 MB each in the 1B-like model) go to ONNX Runtime as
        # arrays beside a data-less stub instead of inside the segment's bytes: copying them into the graph, shape
        # inference and serialization took 12 of the 16 s of that model's first generation.
        kept, big = [], []
        for t in segment.initializers:
            (big if tensor_bytes(t) > INLINE_BYTES else kept).append(t)
        kept += [_stub(t) for t in big]
        graph = helper.make_graph(segment.nodes, f"{self.name}.segment{index}", inputs, outputs, kept)
        model = helper.make_model(graph, opset_imports=self.opset_import, ir_version=self.ir_version)
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {
            v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)
        }
        del model.graph.output[:]
        for o in segment.outputs:
            if not types.get(o):
                raise RuntimeError(f"{self.name}: cannot infer the type of {o} in segment {index}")
            model.graph.output.append(helper.make_tensor_value_info(o, types[o], None))
        options = ort.SessionOptions()
        # The segments between kernels are small (norms, rotary, attention on a few rows): one thread each. A pool per
        # segment would wake (or spin) a worker on every call: 121 pools made 2-thread decode slower than 1-thread.
        # Except a segment that multiplies by a large dense weight (a dense lm_head: 262 MB in the 1B-like model, a
        # GEMV bound by memory): it gets the session's threads, its pool not spinning (the same rule as a whole graph's
        # beside the kernels).
        ort_threads_beside_kernels(options, segment.nodes, big, self.threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if self.optimization_level is not None:
            options.graph_optimization_level = self.optimization_level
        if big:  # ONNX Runtime copies them in while it builds the session
            arrays = [ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(t)) for t in big]
            options.add_external_initializers([t.name for t in big], arrays)
        segment.session = ort.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
        return segment.session

    def _first_run(self, segment: _Segment, index: int, env: dict, feeds: dict) -> list:
        """Run a segment for the first time (in ONNX Runtime) and choose what runs it from now on."""
        session = self._session(segment, index, env)
        expected = session.run(segment.outputs, feeds)
        segment.run = lambda f: session.run(segment.outputs, f)
        if not self.fuse:
            return expected
        try:
            fused = FusedSegment.build(segment.nodes, segment.inputs, segment.outputs, segment.initializers)
        except Unsupported as e:
            log.debug("%s: segment %d stays with ONNX Runtime: %s", self.name, index, e)
            return expected
        fused.fallback = segment.run
        if fused.checks is not None:  # checked on the first call of each kind, this one included
            segment.run, segment.native = fused.run, fused
            return fused.first_of_kind(feeds, expected)
        got = fused.run_native(feeds)
        differs = "inputs the form does not take" if got is None else fused.check_against(expected, got)
        if differs:
            log.warning("%s: segment %d (%s) stays with ONNX Runtime: %s", self.name, index, fused.kind, differs)
            return expected
        segment.run, segment.native = fused.run, fused
        return expected

    def fused_segment_count(self, kind: str | None = None) -> int:
        """Segments run by native code (of one FusedSegment kind; known once each segment has run once)."""
        return sum(
            isinstance(s, _Segment) and s.native is not None and not s.native.refused and kind in (None, s.native.kind)
            for s in self.steps
        )

    def run(self, output_names, feeds: dict, run_options=None) -> list[np.ndarray]:
        missing = [i.name for i in self._inputs if i.name not in feeds]
        if missing:
            raise ValueError(f"{self.name}: missing inputs {missing}")
        env = dict(feeds)
        for index, step in enumerate(self.steps):
            if isinstance(step, _KernelStep):
                env[step.output] = step.run(env[step.input])
            else:
                inputs = {i: env[i] for i in step.inputs}
                outputs = step.run(inputs) if step.run else self._first_run(step, index, env, inputs)
                env.update(zip(step.outputs, outputs))
            for name in self._drop[index]:
                env.pop(name, None)
        return [env[o] for o in (output_names or [o.name for o in self._outputs])]
