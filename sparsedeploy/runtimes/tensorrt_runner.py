"""TensorRT engines built from an ONNX graph, dense and with 2:4 sparse weights, and timed on the GPU.

`build_engine(onnx, sparse=True)` sets BuilderFlag.SPARSE_WEIGHTS, which lets TensorRT pick sparse
tensor-core kernels (Ampere or newer) for MatMul/Conv weights that are 2:4 along the reduction axis
(what `sparsedeploy export --target tensorrt` verifies); `sparse=False` is the dense build of the same
graph. TensorRT logs which layers were eligible and which took a sparse kernel; both lists are kept.

Needs the `tensorrt` package and a CUDA GPU. TensorRT's libraries are published only on NVIDIA's index
(`pip install tensorrt-cu12` or `tensorrt-cu13`; the PyPI packages of those names are stubs that
download from pypi.nvidia.com at install time). Device buffers are torch CUDA tensors, so no other CUDA
binding is needed. Engines here have static shapes (the decoder-stack and linear-skeleton forms that
`sparsedeploy.bench.run` builds), so no optimisation profile is set.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsedeploy.common.errors import UserError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install NVIDIA's TensorRT wheels (`pip install tensorrt-cu12` or `tensorrt-cu13`, matching your CUDA; "
    "they download from pypi.nvidia.com)"
)


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (None when it can): no CUDA, or no tensorrt package."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return (
            "CUDA is not available on this machine, so no TensorRT engine was built "
            "(use --engine ort or deepsparse on CPU)"
        )
    if importlib.util.find_spec("tensorrt") is None:
        return f"the tensorrt package is not importable: {INSTALL_HINT}"
    return None


def _trt():
    try:
        import tensorrt
    except ImportError as exc:
        raise UserError(f"cannot import tensorrt ({exc}): {INSTALL_HINT}") from None
    return tensorrt


def _capture_logger(trt, min_severity):
    """A TensorRT logger that keeps every message (the sparse-layer report comes as INFO) and forwards warnings."""

    class Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg) -> None:  # noqa: A003 - TensorRT's interface
            self.messages.append(str(msg))
            if int(severity) <= int(min_severity):  # lower is more severe
                log.warning("TensorRT: %s", msg)

    return Capture()


def sparse_layer_report(messages: list[str]) -> dict[str, list[str]]:
    """The layers TensorRT found eligible for sparse math and those it built with a sparse kernel.

    TensorRT (8.x-10.x) logs `(Sparsity) Layers eligible for sparse math: a, b, ...` and
    `(Sparsity) TRT inference plan picked sparse implementation for layers: a, ...`.
    """
    out: dict[str, list[str]] = {"eligible": [], "picked_sparse": []}
    for msg in messages:
        low = msg.lower()
        for key, marker in (
            ("eligible", "eligible for sparse math:"),
            ("picked_sparse", "picked sparse implementation for layers:"),
        ):
            at = low.find(marker)
            if at >= 0:
                out[key].extend(x.strip() for x in msg[at + len(marker) :].split(",") if x.strip())
    return out


@dataclass
class BuiltEngine:
    plan: bytes
    sparse: bool
    precision: str
    build_seconds: float
    layers: dict[str, list[str]] = field(default_factory=dict)


def build_engine(onnx_path: Path, sparse: bool, fp16: bool = True, workspace_gib: float = 4.0) -> BuiltEngine:
    """Parse `onnx_path` (external data beside it is found) and build a serialized engine."""
    from sparsedeploy.common.files import safe_external_data

    safe_external_data(onnx_path)  # the parser would read any `location` the file names
    trt = _trt()
    logger = _capture_logger(trt, trt.ILogger.Severity.WARNING)
    builder = trt.Builder(logger)
    flags = trt.NetworkDefinitionCreationFlag
    # Explicit batch: required by the ONNX parser in TensorRT 8.x, the only mode (flag ignored) since 10.
    network = builder.create_network(1 << int(flags.EXPLICIT_BATCH) if hasattr(flags, "EXPLICIT_BATCH") else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    precision = "fp32 (TF32 allowed)"
    if fp16 and hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11 is strongly typed only: the graph's own types
        config.set_flag(trt.BuilderFlag.FP16)
        precision = "fp16 allowed (BuilderFlag.FP16)"
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        tail = " | ".join(logger.messages[-3:])
        raise UserError(f"TensorRT could not build an engine from {onnx_path}: {tail[:400]}")
    layers = sparse_layer_report(logger.messages)
    seconds = time.perf_counter() - start
    log.info(
        "TensorRT %s engine of %s built in %.1f s; sparse kernels in %d of %d eligible layers",
        "sparse" if sparse else "dense",
        onnx_path.name,
        seconds,
        len(layers["picked_sparse"]),
        len(layers["eligible"]),
    )
    return BuiltEngine(bytes(plan), sparse, precision, seconds, layers)


_TORCH_DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "INT8": "int8",
    "UINT8": "uint8",
}


class EngineRunner:
    """One engine, its inputs (random, from a fixed seed, or given) and outputs as torch CUDA tensors."""

    def __init__(self, built: BuiltEngine, device, inputs: dict[str, np.ndarray] | None = None, seed: int = 0) -> None:
        import torch

        trt = _trt()
        self.logger = _capture_logger(trt, trt.ILogger.Severity.ERROR)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(built.plan)
        if self.engine is None:
            raise UserError(
                "TensorRT could not deserialize the engine it just built: "
                + " | ".join(self.logger.messages[-3:])[:400]
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device)
        gen = torch.Generator().manual_seed(seed)
        self.inputs: dict[str, object] = {}
        self.outputs: dict[str, object] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(
                    f"TensorRT tensor {name} has a dynamic shape {shape}: this runner takes static-shape engines"
                )
            dtype = getattr(torch, _TORCH_DTYPE_NAMES[self.engine.get_tensor_dtype(name).name])
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                value = (
                    torch.from_numpy(inputs[name]) if inputs and name in inputs else torch.randn(shape, generator=gen)
                )
                tensor = value.to(dtype).to(device).contiguous()
                self.inputs[name] = tensor
            else:
                tensor = torch.empty(shape, dtype=dtype, device=device)
                self.outputs[name] = tensor
            self.context.set_tensor_address(name, tensor.data_ptr())

    def __call__(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise UserError("TensorRT execution failed: " + " | ".join(self.logger.messages[-3:])[:400])
        self.stream.synchronize()

    def numpy_inputs(self) -> dict[str, np.ndarray]:
        return {
            k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in self.inputs.items()
        }

    def numpy_outputs(self) -> dict[str, np.ndarray]:
        return {k: v.float().cpu().numpy() for k, v in self.outputs.items()}
