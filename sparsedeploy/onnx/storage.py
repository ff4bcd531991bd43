"""Compact storage for the zeros of an exported ONNX model, and loading ONNX models of either storage.

``dense`` storage is a plain ONNX file (plus ``model.onnx_data`` external data over 2 GB): every
runtime loads it. ``sparse`` storage moves each sufficiently sparse weight initializer out of
``model.onnx`` into ``sparse_weights.safetensors`` as a packed bitmap (1 bit per element, 1 = non-zero)
plus the non-zero values in row-major order; the initializer stays declared in the graph as an empty
placeholder. It is smaller on disk (about 2.1 bytes per fp32 element at 50 % instead of 4) but no
runtime reads it directly: :func:`load_model_proto` rebuilds the dense initializers in memory first.

Neither storage makes ONNX Runtime compute faster: its CPU kernels multiply the zeros like any
other value. The sparse file only saves disk space and transfer time.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from sparsedeploy.common.errors import UserError
from sparsedeploy.common.files import _umask
from sparsedeploy.onnx.sparse_linear import DOMAIN as SPARSE_LINEAR_DOMAIN

log = logging.getLogger(__name__)

SPARSE_FILE = "sparse_weights.safetensors"
SPARSE_MARKER = "sparsedeploy.sparse_storage"
TWO_GB = 2 * 1024**3
EXTERNAL = 1  # onnx.TensorProto.EXTERNAL (data_location of a tensor whose bytes live in another file)
DEFAULT = 0  # onnx.TensorProto.DEFAULT (its bytes in the proto)
# A weight is worth packing when the bitmap plus the non-zeros are smaller than the dense values.
MIN_PACK_SPARSITY = 0.05


# An export directory's model, in order of preference: ours, then optimum's decoder files.
MODEL_FILES = ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx")


def onnx_file(path: Path | str, what: str = "ONNX model") -> Path:
    """The .onnx file for a path that is either the file or an export directory (`what` names it in errors)."""
    path = Path(path)
    if path.is_dir():
        for name in MODEL_FILES:
            if (path / name).is_file():
                return path / name
        onnx_files = sorted(path.glob("*.onnx"))
        if len(onnx_files) == 1:
            return onnx_files[0]
        raise UserError(f"no model.onnx in {path}: point {what} at an ONNX export directory or pass its .onnx file")
    if not path.exists():
        raise UserError(f"{what} {path} does not exist: check the path or run `sparsedeploy export` first")
    if path.suffix != ".onnx":
        raise UserError(f"{what} {path} is not a directory or .onnx file: give an ONNX export directory")
    return path


def load_model_proto(path: Path | str, load_external: bool = True):
    """Load an ONNX model (either storage) with all initializers dense; corrupt files give one clear line."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import load_external_data_for_model

    from sparsedeploy.common.files import safe_external_data

    file = onnx_file(path)
    try:
        model = onnx.load(str(file), load_external_data=False)
        if load_external:
            safe_external_data(file, model)  # refuses external data outside the model's folder, before reading any
            load_external_data_for_model(model, str(file.parent))
    except DecodeError as exc:
        raise UserError(
            f"cannot read ONNX model {file}: the file is truncated or corrupt ({exc}); export it again"
        ) from None
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read ONNX model {file}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__} "
            "(missing or truncated external data?); export it again"
        ) from None
    if len(model.graph.node) == 0:
        raise UserError(f"ONNX model {file} has an empty graph: the file is truncated or not a model; export it again")
    if is_sparse_storage(model):
        unpack_sparse(model, file.parent / SPARSE_FILE)
    return model


def is_sparse_storage(model) -> bool:
    return any(p.key == SPARSE_MARKER for p in model.metadata_props)


def pack_bits(nonzero: np.ndarray) -> np.ndarray:
    return np.packbits(nonzero.reshape(-1), bitorder="little")


def unpack_bits(bits: np.ndarray, count: int) -> np.ndarray:
    return np.unpackbits(bits, count=count, bitorder="little").astype(bool)


def pack_sparse(model, out_dir: Path, min_sparsity: float = MIN_PACK_SPARSITY) -> dict:
    """Move sparse 2-D+ float initializers of `model` (in place) into `out_dir`/SPARSE_FILE; return statistics."""
    from onnx import helper, numpy_helper
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    packed, dense_bytes, packed_bytes = [], 0, 0
    for index, init in enumerate(model.graph.initializer):
        if len(init.dims) < 2 or init.data_type not in (1, 10, 11, 16):  # float, float16, double, bfloat16
            continue
        array = numpy_helper.to_array(init)
        nonzero = array != 0
        sparsity = 1.0 - float(nonzero.mean())
        if sparsity < min_sparsity:
            continue
        key = f"w{index}"
        tensors[f"{key}.bits"] = pack_bits(nonzero)
        tensors[f"{key}.values"] = np.ascontiguousarray(array[nonzero])
        dense_bytes += array.nbytes
        packed_bytes += tensors[f"{key}.bits"].nbytes + tensors[f"{key}.values"].nbytes
        packed.append({"name": init.name, "key": key, "dims": list(init.dims), "data_type": init.data_type})
        placeholder = helper.make_tensor(init.name, init.data_type, [0], [])
        placeholder.doc_string = f"{SPARSE_MARKER}:{key}"
        init.CopyFrom(placeholder)
    save_file(tensors, str(Path(out_dir) / SPARSE_FILE), metadata={"format": "bitmap-v1", "index": json.dumps(packed)})
    model.metadata_props.add(key=SPARSE_MARKER, value=SPARSE_FILE)
    return {"packed_weights": len(packed), "dense_bytes": dense_bytes, "packed_bytes": packed_bytes}


def unpack_sparse(model, sparse_file: Path) -> None:
    """Rebuild the dense initializers of a sparse-storage model in place."""
    from onnx import helper, numpy_helper
    from safetensors import safe_open

    if not sparse_file.is_file():
        raise UserError(
            f"{sparse_file} is missing: the model uses sparse storage and needs it beside model.onnx; export again"
        )
    try:
        handle = safe_open(str(sparse_file), framework="numpy")
        index = {entry["name"]: entry for entry in json.loads(handle.metadata()["index"])}
    except Exception as exc:  # noqa: BLE001 - any parse failure of the side file is one clear line
        raise UserError(f"cannot read {sparse_file}: {exc}; the file is corrupt, export again") from None
    for init in model.graph.initializer:
        if not init.doc_string.startswith(SPARSE_MARKER):
            continue
        entry = index.get(init.name)
        if entry is None:
            raise UserError(
                f"{sparse_file} has no data for initializer {init.name}: the files do not belong together; export again"
            )
        dims = entry["dims"]
        count = int(np.prod(dims))
        nonzero = unpack_bits(handle.get_tensor(entry["key"] + ".bits"), count)
        values = handle.get_tensor(entry["key"] + ".values")
        if int(nonzero.sum()) != values.size:
            raise UserError(
                f"{sparse_file}: initializer {init.name} has {int(nonzero.sum())} non-zeros in its bitmap but "
                f"{values.size} values; export again"
            )
        dense = np.zeros(count, dtype=helper.tensor_dtype_to_np_dtype(entry["data_type"]))
        dense[nonzero] = values
        init.CopyFrom(numpy_helper.from_array(dense.reshape(dims), init.name))
    del model.metadata_props[:]  # the rebuilt model is an ordinary dense model


def external_data_path(file: Path) -> Path:
    """Where save_model_proto puts a model's external data: `model.onnx` -> `model.onnx_data` beside it."""
    file = Path(file)
    return file.with_name(file.name + "_data")


def _external_maps(file: Path, model) -> list[tuple[str, np.ndarray]]:
    """For a graph read without its external data, to be built from memory: each external-data initializer as
    (name, read-only memory map of its bytes), what ``add_external_initializers`` hands ONNX Runtime (nothing is
    copied); a Constant node's external tensor (small by nature) is read into the graph."""
    from onnx import helper
    from onnx.external_data_helper import load_external_data_for_tensor

    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t") and attr.t.data_location == EXTERNAL:
                load_external_data_for_tensor(attr.t, str(file.parent))
                attr.t.data_location = DEFAULT
                del attr.t.external_data[:]
    maps = []
    for tensor in model.graph.initializer:
        if tensor.data_location != EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        shape = tuple(tensor.dims)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if int(info.get("length", size)) != size:
            raise UserError(f"{file}: external data of {tensor.name} is not {size} bytes: the export is corrupt")
        offset = int(info.get("offset", 0))
        data = np.memmap(file.parent / info["location"], dtype=dtype, mode="r", offset=offset, shape=shape)
        maps.append((tensor.name, data))
    return maps


def too_big_for_one_file(model) -> bool:
    """Whether `model` is too close to protobuf's 2 GB limit to be serialised in one piece.

    Summed per initializer: ModelProto.ByteSize() itself raises EncodeError past 2 GB.
    """
    total = 0
    for init in model.graph.initializer:
        total += init.ByteSize() if init.data_location != EXTERNAL else 0  # external: only a reference here
        if total > TWO_GB - 64 * 1024**2:
            return True
    for node in model.graph.node:  # Constant nodes and other tensor attributes
        total += sum(attr.t.ByteSize() for attr in node.attribute if attr.HasField("t"))
    return total > TWO_GB - 64 * 1024**2


def save_model_proto(model, file: Path, external: bool | None = None) -> None:
    """Save `model` to `file`; external data (model.onnx_data) when asked or when it would not fit in 2 GB."""
    import onnx

    file = Path(file)
    if external is None:
        external = too_big_for_one_file(model)
    if external:
        data = external_data_path(file)
        onnx.save_model(
            model,
            str(file),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        os.chmod(data, 0o666 & ~_umask())  # onnx creates it 0600; readable like model.onnx
    else:
        onnx.save_model(model, str(file))


def session_from_path(
    path: Path | str,
    threads: int | None = None,
    optimization: str = "all",
    providers: list[str] | None = None,
    last_logits: bool = False,
    custom_op_library: Path | str | None = None,
):
    """An onnxruntime.InferenceSession for a model of either storage; for a sparse-cpu export (SparseLinear nodes) a
    SegmentedSession with the same interface (get_inputs, get_outputs, run). last_logits: ``logits`` for the last
    position only, the graph edited in memory (onnx/last_logits.py; what generation reads); LastLogitsUnavailable
    when the graph's lm_head is not one it can cut. custom_op_library: sparsedeploy's ONNX Runtime custom-op library
    (scripts/build_ort_op.sh), registered in the session, so a sparse-cpu export runs whole in ONNX Runtime (its
    kernels on `threads` threads, ONNX Runtime's own nodes on one, as in the segmented session) instead of
    segmented; where the graph was read (last_logits, sparse storage), the session's ``sparsedeploy_kernel_nodes``
    counts the nodes that run in the library."""
    import onnxruntime as ort

    from sparsedeploy.common.files import safe_external_data
    from sparsedeploy.onnx.last_logits import cut_to_last_position

    file = onnx_file(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if custom_op_library is not None:
        register_op_library(options, custom_op_library, threads)
    whole = custom_op_library is not None  # kernel nodes run inside ONNX Runtime: no segmenting
    providers = providers or ["CPUExecutionProvider"]
    # The graph is read here when it must be rebuilt (sparse storage) or edited (last_logits); else ONNX Runtime
    # reads the file itself.
    model, complete = None, False  # complete: every weight in the proto (no external-data references)
    if (file.parent / SPARSE_FILE).is_file():
        model, complete = load_model_proto(file), True
        if too_big_for_one_file(model):
            raise UserError(
                f"{file} uses sparse storage and is over 2 GB dense: re-export with --storage dense for this size"
            )
    elif last_logits:
        model = load_model_proto(file, load_external=False)  # a corrupt file: one clear line
        safe_external_data(file, model)
    else:
        safe_external_data(file)  # onnxruntime would read any `location` the file names
    if not whole and model is not None and any(n.domain == SPARSE_LINEAR_DOMAIN for n in model.graph.node):
        return _segmented_session(file, model if complete else None, threads, options, last_logits)
    if whole:  # the graph, where it was read, may give ONNX Runtime the threads
        from sparsedeploy.onnx.graph import ort_threads_beside_kernels

        read = model is not None
        ort_threads_beside_kernels(
            options, model.graph.node if read else [], model.graph.initializer if read else [], threads
        )
    maps = []
    if last_logits:
        cut_to_last_position(model, str(file), whole_graph=whole)
        try:
            maps = _external_maps(file, model)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot read the external data of ONNX model {file}: {str(exc).splitlines()[0][:200]} (missing or "
                "truncated?); export it again"
            ) from None
        if maps:
            names, arrays = zip(*maps)
            options.add_external_initializers(list(names), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    try:
        session = ort.InferenceSession(
            str(file) if model is None else model.SerializeToString(), sess_options=options, providers=providers
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        if model is None and not whole and f"{SPARSE_LINEAR_DOMAIN}:" in str(exc):
            return _segmented_session(file, None, threads, options, last_logits)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"ONNX Runtime cannot load {file}: {first[:300]}; the file may be truncated or corrupt, export it again"
        ) from None
    if maps:
        session.sparsedeploy_weight_maps = maps  # ONNX Runtime reads the weights from them: they live with the session
    if whole and model is not None:  # the graph is in hand: how many of its nodes run in sparsedeploy's kernels
        session.sparsedeploy_kernel_nodes = sum(n.domain == SPARSE_LINEAR_DOMAIN for n in model.graph.node)
    return session


def register_op_library(options, library: Path | str, threads: int | None) -> None:
    """Register sparsedeploy's ONNX Runtime custom-op library (SparseLinear, Int8Linear, Int8Gather) in `options`,
    its kernels on `threads` threads (None: the CPUs this process may run on). UserError naming the fix when the
    file is missing or ONNX Runtime cannot load it."""
    library = Path(library)
    if not library.is_file():
        raise UserError(
            f"custom-op library {library} not found: build it with `bash scripts/build_ort_op.sh` (it prints the path)"
        )
    if threads:
        options.add_session_config_entry("sparsedeploy.threads", str(threads))  # read when the library registers
    try:
        options.register_custom_ops_library(str(library))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"ONNX Runtime cannot load the custom-op library {library}: {first[:300]}; rebuild it with "
            "`bash scripts/build_ort_op.sh`"
        ) from None


def _segmented_session(file: Path, model, threads: int | None, options, last_logits: bool):
    """A sparse-cpu export: ONNX Runtime runs its standard operators, sparsedeploy's kernels its SparseLinear (and
    Int8Linear / Int8Gather) nodes. `model`: the graph with every weight read, or None to read it here."""
    from sparsedeploy.onnx.segmented import SegmentedSession

    model = load_model_proto(file) if model is None else model
    return SegmentedSession(model, threads, options.graph_optimization_level, name=str(file), last_logits=last_logits)
