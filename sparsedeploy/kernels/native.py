"""ctypes binding of the sparse-cpu native kernels (csrc/sparse_cpu.c, built at install by setup.py).

ctypes releases the GIL for the duration of each call; calls from several Python threads serialize
inside the library (one thread pool).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import weakref
from functools import lru_cache
from pathlib import Path

import numpy as np

from sparsedeploy.kernels.format import (
    COL_PAD,
    PAD,
    ROW_FORM_MAX_K,
    TILE_COLS,
    TILE_ROWS,
    PackedLinear,
    RowForm,
    TileForm,
    byte_bound_ceiling,
)
from sparsedeploy.kernels.scaled_int8 import ScaledInt8Linear

__all__ = [
    "FORMS",
    "ISAS",
    "BoundInt8Matmul",
    "BoundMatmul",
    "NativeLibraryMissing",
    "available_isas",
    "best_isa",
    "cpu_profile",
    "set_cpu_profile",
    "byte_bound_ceiling",
    "core_round_trip_ns",
    "add_rmsnorm",
    "attention",
    "library_path",
    "matmul",
    "derived_nbytes",
    "pick_form",
    "row_form",
    "silu_mul",
    "tile_form",
]

# name -> the library's ISA code; ordered best first
ISAS = {"avx512": 3, "avx2": 2, "portable": 1}
# The forms a packed weight is multiplied in (the library's codes): "bitmask" reads the PackedLinear itself, "rows" its
# row form (format.RowForm, K up to format.ROW_FORM_MAX_K; calls of 32 rows of x), "tiles" its tile form
# (format.TileForm; calls of 64 rows of x). Which form a call runs in is the library's choice (sparse_cpu.c
# pick_form), so this binding and the ONNX Runtime op library run each call alike.
FORMS = {"bitmask": 1, "rows": 2, "tiles": 3}
MAX_BATCH_CHUNK = 256  # rows of x a bitmask-form call (sparse_cpu.c SDK_MAX_BATCH_CHUNK)
TILE_FORM_BATCH = 64  # the tile-form kernel's lanes (sparse_cpu.c SDK_TILE_LANES; 8 up to batch 8): rows of x a call
_ERR_NOMEM = -3  # sparse_cpu.c ERR_NOMEM: a derived form could not be allocated
_NATIVE = "sparsedeploy.kernels._native"


class NativeLibraryMissing(RuntimeError):
    """The compiled kernel library is not there (the package was not built/installed)."""


def library_path() -> Path:
    """Where the compiled library is (SPARSEDEPLOY_SPARSE_CPU_LIB overrides)."""
    override = os.environ.get("SPARSEDEPLOY_SPARSE_CPU_LIB")
    if override:
        return Path(override)
    spec = importlib.util.find_spec(_NATIVE)
    if spec is None or not spec.origin:
        raise NativeLibraryMissing(
            f"the sparse-cpu kernel library ({_NATIVE}) is not built: reinstall the package "
            "(`pip install -e .` or `bash scripts/install.sh`; "
            "it compiles csrc/sparse_cpu.c with the system C compiler)"
        )
    return Path(spec.origin)


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    lib.sdk_supported_isas.restype = ctypes.c_int
    lib.sdk_supported_isas.argtypes = []
    lib.sdk_core_round_trip_ns.restype = ctypes.c_double
    lib.sdk_core_round_trip_ns.argtypes = [ctypes.c_int]
    lib.sdk_matmul.restype = ctypes.c_int
    lib.sdk_matmul.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.sdk_matmul_4of8.restype = ctypes.c_int
    lib.sdk_matmul_4of8.argtypes = lib.sdk_matmul.argtypes
    lib.sdk_rows_matmul.restype = ctypes.c_int
    lib.sdk_rows_matmul.argtypes = lib.sdk_matmul.argtypes
    lib.sdk_row_form.restype = ctypes.c_int
    lib.sdk_row_form.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3
    lib.sdk_tile_form.restype = ctypes.c_int
    lib.sdk_tile_form.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 5
    lib.sdk_tiles_matmul.restype = ctypes.c_int
    lib.sdk_tiles_matmul.argtypes = (
        [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        + [ctypes.c_void_p] * 5
        + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    )
    lib.sdk_pick_form.restype = ctypes.c_int
    lib.sdk_pick_form.argtypes = [ctypes.c_int64, ctypes.c_double, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.sdk_linear_new.restype = ctypes.c_void_p
    lib.sdk_linear_new.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
    lib.sdk_linear_free.restype = None
    lib.sdk_linear_free.argtypes = [ctypes.c_void_p]
    lib.sdk_linear_form.restype = ctypes.c_int
    lib.sdk_linear_form.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.sdk_linear_matmul.restype = ctypes.c_int
    lib.sdk_linear_matmul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + [
        ctypes.c_int
    ] * 3
    lib.sdk_linear_four_of_eight.restype = ctypes.c_int
    lib.sdk_linear_four_of_eight.argtypes = [ctypes.c_void_p]
    lib.sdk_linear_derived_bytes.restype = ctypes.c_int64
    lib.sdk_linear_derived_bytes.argtypes = [ctypes.c_void_p]
    lib.sdk_cpu_profile.restype = ctypes.c_int
    lib.sdk_cpu_profile.argtypes = []
    lib.sdk_set_cpu_profile.restype = ctypes.c_int
    lib.sdk_set_cpu_profile.argtypes = [ctypes.c_int]
    lib.sdk_int8_matmul.restype = ctypes.c_int
    lib.sdk_int8_matmul.argtypes = (
        [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        + [ctypes.c_void_p] * 2
        + [
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
        ]
    )
    lib.sdk_add_rmsnorm.restype = ctypes.c_int
    lib.sdk_add_rmsnorm.argtypes = (
        [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float] + [ctypes.c_void_p] * 2
    )
    lib.sdk_silu_mul.restype = ctypes.c_int
    lib.sdk_silu_mul.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.sdk_attention.restype = ctypes.c_int
    lib.sdk_attention.argtypes = (
        [ctypes.c_void_p]
        + [ctypes.c_int64] * 5
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int64]
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int64, ctypes.c_void_p]
        + [ctypes.c_int64] * 3
        + [ctypes.c_float] * 2
        + [ctypes.c_void_p] * 3
        + [ctypes.c_int]
    )
    return lib


def available_isas() -> list[str]:
    """The dispatch paths this CPU can run, best first (always ends with "portable")."""
    bits = _lib().sdk_supported_isas()
    return [name for name, code in ISAS.items() if bits >> code & 1]


# name -> the library's CPU profile code: how the kernels prefetch and which batch-1 AVX-512 GEMV they use
# (docs/sparse_cpu.md); chosen from the CPU's vendor at the first call
CPU_PROFILES = {"amd": 0, "intel": 1}


def cpu_profile() -> str:
    """The CPU profile the kernels use ("amd" for AMD and any non-Intel CPU, "intel")."""
    code = _lib().sdk_cpu_profile()
    return next(name for name, c in CPU_PROFILES.items() if c == code)


def set_cpu_profile(name: str) -> None:
    """Force a CPU profile (tests and benchmarks time and check both on one machine; both are correct anywhere)."""
    if name not in CPU_PROFILES:
        raise ValueError(f"unknown CPU profile {name!r}: use one of {list(CPU_PROFILES)}")
    _lib().sdk_set_cpu_profile(CPU_PROFILES[name])


def best_isa() -> str:
    return available_isas()[0]


def core_round_trip_ns(iters: int = 5000, repeats: int = 5) -> float | None:
    """ns for a cache line to go from one core to another and back, between this thread and one it starts, placed by
    the OS as the kernels' pool worker is (sparse_cpu.c sdk_core_round_trip_ns): the median over `repeats`
    measurements of `iters` round trips each (a new thread's first moments may find it on the caller's CPU).
    Several times larger across L3 domains than inside one, and 2-thread calls pay for it (benchmarks record it
    beside 2-thread figures). None where it cannot be measured: one CPU for both threads, or no thread started."""
    if iters < 1 or repeats < 1:
        raise ValueError(f"core_round_trip_ns: iters and repeats must be >= 1, got {iters} and {repeats}")
    runs = []
    for _ in range(repeats):
        ns = float(_lib().sdk_core_round_trip_ns(int(iters)))
        if ns <= 0:  # no thread, or not `iters` round trips in 100 ms: the two threads share one CPU
            return None
        runs.append(ns)
    return float(np.median(runs))


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _address(a: np.ndarray) -> int:
    """The address of a C-contiguous array's data (0 for an empty one), for a ctypes call. ``a.ctypes.data`` costs
    ~2.5 us on the Intel box; this ~0.5 us, and a decode step passes ~300 arrays (docs/sparse_cpu.md)."""
    if not a.size:
        return 0
    if a.flags.writeable:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    return a.ctypes.data


def _isa_code(isa: str | None, caller: str = "matmul") -> int:
    if isa is None:
        return 0
    if isa not in ISAS:
        raise ValueError(f"{caller}: unknown isa {isa!r}: use one of {list(ISAS)}")
    if isa not in available_isas():
        raise ValueError(f"{caller}: isa {isa!r} does not run on this CPU: use one of {available_isas()}")
    return ISAS[isa]


def _check_threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"matmul: threads must be a positive int, got {threads!r}")
    return int(threads)


def _check_x(caller: str, weight: str, x2: np.ndarray, n: int, k: int) -> None:
    """x of a bound matmul: C-contiguous float32 [B, K] (ValueError naming the weight's shape otherwise)."""
    if x2.dtype != np.float32 or x2.ndim != 2 or x2.shape[1] != k or not x2.flags.c_contiguous:
        raise ValueError(
            f"{caller}: x must be C-contiguous float32 [B, {k}] (K of the {weight} {n}x{k}), got {x2.dtype} {x2.shape}"
        )


def pick_form(batch: int, density: float, k: int, isa: str, profile: str) -> str:
    """The form the library runs a call of `batch` rows of x in, for a weight of `k` columns with this fraction of
    stored elements, on this dispatch path and CPU profile (sparse_cpu.c pick_form, where each rule's measurements
    are): the 8-lane tile form on the "amd" profile at batches 5-8 over 12 % stored, else the row form where it pays
    (K up to format.ROW_FORM_MAX_K), else the tile form for prefill (batch over 32) and the bitmask form below it."""
    if isa not in ISAS or profile not in CPU_PROFILES:
        raise ValueError(f"pick_form: isa must be one of {list(ISAS)} and profile one of {list(CPU_PROFILES)}")
    code = _lib().sdk_pick_form(batch, density, k, ISAS[isa], CPU_PROFILES[profile])
    return next(name for name, c in FORMS.items() if c == code)


def _derive(p: PackedLinear, what: str, build, *arrays: np.ndarray) -> None:
    """Fill `arrays` (a derived form's, in the library's argument order) from the packed weight with the library's
    `build` call, then make them read-only."""
    n, k = p.shape
    rc = build(
        p.mask.ctypes.data, p.values.ctypes.data, p.block_ptr.ctypes.data, n, k, *(a.ctypes.data for a in arrays)
    )
    if rc != 0:
        raise RuntimeError(f"sparse-cpu {what} failed (code {rc}) for weight {n}x{k}")
    for a in arrays:
        a.flags.writeable = False


def row_form(p: PackedLinear) -> RowForm:
    """The row form of a packed weight as arrays (the library builds its own copy inside a bound weight where a call
    runs in it; this one is for reading: tests, docs)."""
    n, k = p.shape
    if k > ROW_FORM_MAX_K:
        raise ValueError(f"row form: K={k} is more than its uint16 columns hold ({ROW_FORM_MAX_K})")
    row_ptr = np.empty(n + 1, dtype=np.int64)
    cols = np.zeros(p.nnz + COL_PAD, dtype=np.uint16)
    values = np.zeros(p.nnz + PAD, dtype=np.float32)
    _derive(p, "row form", _lib().sdk_row_form, row_ptr, cols, values)
    return RowForm(row_ptr=row_ptr, cols=cols, values=values, shape=(n, k))


def tile_form(p: PackedLinear) -> TileForm:
    """The tile form of a packed weight as arrays (built by the library; as row_form, for reading)."""
    n, k = p.shape
    tile_ptr = np.empty(-(-n // TILE_ROWS) + 1, dtype=np.int64)
    counts = np.empty((-(-n // TILE_ROWS), -(-k // TILE_COLS), TILE_ROWS), dtype=np.uint8)
    rows = np.empty_like(counts)
    cols = np.zeros(p.nnz + COL_PAD, dtype=np.uint8)
    values = np.zeros(p.nnz + PAD, dtype=np.float32)
    _derive(p, "tile form", _lib().sdk_tile_form, tile_ptr, counts, rows, cols, values)
    return TileForm(tile_ptr=tile_ptr, counts=counts, rows=rows, cols=cols, values=values, shape=(n, k))


class _Linear:
    """The library's bound weight (sparse_cpu.c sdk_linear) for one PackedLinear: its derived forms, built at the
    first call that runs in them, and its 4-of-8 check. One per PackedLinear while it lives (_linear), so every
    BoundMatmul of a weight (and `matmul`, which binds anew each call) shares what was built."""

    def __init__(self, p: PackedLinear) -> None:
        n, k = p.shape
        handle = _lib().sdk_linear_new(p.mask.ctypes.data, p.values.ctypes.data, p.block_ptr.ctypes.data, n, k)
        if not handle:
            raise MemoryError(f"sparse-cpu: could not bind weight {n}x{k}")
        self.handle = handle
        self._free = weakref.finalize(self, _lib().sdk_linear_free, handle)


_LINEARS: dict[int, _Linear] = {}


def _linear(p: PackedLinear) -> _Linear:
    """p's bound weight, made at the first call and kept while `p` lives (keyed by id: not hashable by value)."""
    bound = _LINEARS.get(id(p))
    if bound is None:
        bound = _LINEARS[id(p)] = _Linear(p)
        weakref.finalize(p, _LINEARS.pop, id(p), None)
    return bound


def derived_nbytes(p: PackedLinear) -> int:
    """Bytes the library holds for `p` in derived forms (the row and tile forms its calls have needed so far)."""
    return int(_lib().sdk_linear_derived_bytes(_linear(p).handle))


class BoundMatmul:
    """``matmul`` for one packed weight with the weight, thread and ISA checks done once.

    What a runtime calls for every token: ``bound(x)`` takes x float32 C-contiguous ``[B, K]`` and returns a new
    ``[B, N]``. ``matmul`` itself goes through here. form: None lets the library pick per call (``form_for``; the
    rules are sparse_cpu.c pick_form's, shared with the ONNX Runtime op library), one of FORMS forces one (tests and
    benchmarks).
    """

    def __init__(
        self, p: PackedLinear, threads: int | None = None, isa: str | None = None, form: str | None = None
    ) -> None:
        if not isinstance(p, PackedLinear):
            raise TypeError(f"matmul: the weight must be a PackedLinear (from format.pack), got {type(p).__name__}")
        if form is not None and form not in FORMS:
            raise ValueError(f"matmul: unknown form {form!r}: use one of {list(FORMS)} (or None to pick per call)")
        self.weight = p
        self.n, self.k = p.shape
        if form == "rows" and self.k > ROW_FORM_MAX_K:
            raise ValueError(f"matmul: the row form holds K up to {ROW_FORM_MAX_K}, this weight has K={self.k}")
        self.threads = _check_threads(threads)
        self.isa = isa
        self.form = form
        self._code = _isa_code(isa)
        self._form_code = FORMS[form] if form else 0
        self._linear = _linear(p)
        self._handle = self._linear.handle
        self._fn = _lib().sdk_linear_matmul

    def form_for(self, batch: int) -> str:
        """The form a call with `batch` rows of x runs in (a prefill's short last call may run in another)."""
        if self.form is not None:
            return self.form
        code = _lib().sdk_linear_form(self._handle, batch, self._code)
        return next(name for name, c in FORMS.items() if c == code)

    def __call__(self, x2: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        _check_x("matmul", "packed weight", x2, self.n, self.k)
        b = x2.shape[0]
        if out is None:
            out = np.empty((b, self.n), dtype=np.float32)
        if b == 0:
            return out
        rc = self._fn(self._handle, _address(x2), b, _address(out), self.threads, self._code, self._form_code)
        if rc == _ERR_NOMEM:
            raise MemoryError(
                f"sparse-cpu: out of memory building the {self.form_for(b)} form of weight {self.n}x{self.k} (a "
                "derived form is built at the first call that needs it): free memory and call again, it is built anew"
            )
        if rc != 0:
            raise RuntimeError(
                f"sparse-cpu kernel failed (code {rc}) for x {x2.shape}, weight {self.n}x{self.k}, isa {self.isa}, "
                f"form {self.form_for(b)}"
            )
        return out


class BoundInt8Matmul:
    """y = x @ W.T for a dense weight stored as scaled-int8 (kernels/scaled_int8.py), checks done once.

    ``bound(x)`` takes x float32 C-contiguous ``[B, K]`` and returns a new ``[B, N]``. AVX-512 CPUs run the AVX2 code.
    """

    def __init__(self, p: ScaledInt8Linear, threads: int | None = None, isa: str | None = None) -> None:
        if not isinstance(p, ScaledInt8Linear):
            raise TypeError(f"int8 matmul: the weight must be a ScaledInt8Linear, got {type(p).__name__}")
        self.weight = p
        self.n, self.k = p.shape
        self.threads = _check_threads(threads)
        self.isa = isa
        self._code = _isa_code(isa, "int8 matmul")
        self._fn = _lib().sdk_int8_matmul
        self._ptrs = (p.q.ctypes.data, p.scales.ctypes.data)

    def __call__(self, x2: np.ndarray) -> np.ndarray:
        _check_x("int8 matmul", "weight", x2, self.n, self.k)
        out = np.empty((x2.shape[0], self.n), dtype=np.float32)
        if x2.shape[0]:
            q, scales = self._ptrs
            rc = self._fn(_address(x2), x2.shape[0], self.k, q, scales, self.n, _address(out), self.threads, self._code)
            if rc != 0:
                raise RuntimeError(
                    f"int8 kernel failed (code {rc}) for x {x2.shape}, weight {self.n}x{self.k}, isa {self.isa}"
                )
        return out


def matmul(
    x: np.ndarray,
    p: PackedLinear,
    threads: int | None = None,
    isa: str | None = None,
    out: np.ndarray | None = None,
    form: str | None = None,
) -> np.ndarray:
    """y = x @ W.T for x float32 [B, K] (or [K]) and W packed in `p`: float32 [B, N] (or [N]).

    threads: worker threads (None: the CPUs this process may run on). isa: force a dispatch path
    ("avx512", "avx2", "portable"; None: the best this CPU runs). out: optional C-contiguous float32 [B, N].
    form: force one of FORMS (None: the faster for the batch, see BoundMatmul.form_for).
    """
    bound = BoundMatmul(p, threads, isa, form)
    n, k = p.shape
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise ValueError(f"matmul: x must be float32, got {x.dtype} (cast with .astype(np.float32))")
    squeeze = x.ndim == 1
    x2 = x[None, :] if squeeze else x
    if x2.ndim != 2 or x2.shape[1] != k or x2.shape[0] < 1:
        raise ValueError(f"matmul: x must be [B, {k}] (K of the packed weight {n}x{k}), got shape {x.shape}")
    x2 = np.ascontiguousarray(x2)
    b = x2.shape[0]
    if out is not None and (
        out.dtype != np.float32 or out.shape != (b, n) or not out.flags.c_contiguous or not out.flags.writeable
    ):
        raise ValueError(f"matmul: out must be a writable C-contiguous float32 array of shape {(b, n)}")
    out = bound(x2, out)
    return out[0] if squeeze else out


def _rows(name: str, x: np.ndarray, width: int) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 1 or x.shape[-1] != width:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{name} must be a float32 array [..., {width}], got {got}")
    return np.ascontiguousarray(x)


def add_rmsnorm(a: np.ndarray, b: np.ndarray, weight: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Residual add + RMSNorm over the last axis: (s, weight * (s / sqrt(mean(s * s) + eps))) for s = a + b.

    a and b: float32 of one shape [..., H]; weight: float32 [H]. Both results have a's shape.
    """
    h = weight.shape[-1] if isinstance(weight, np.ndarray) and weight.ndim == 1 else -1
    weight = _rows("add_rmsnorm: weight", weight, h)
    a = _rows("add_rmsnorm: a", a, h)
    b = _rows("add_rmsnorm: b", b, h)
    if a.shape != b.shape:
        raise ValueError(f"add_rmsnorm: a and b must have one shape, got {a.shape} and {b.shape}")
    s, out = np.empty_like(a), np.empty_like(a)
    rows = a.size // h
    if rows:
        rc = _lib().sdk_add_rmsnorm(
            _address(a), _address(b), _address(weight), rows, h, float(eps), _address(s), _address(out)
        )
        if rc != 0:
            raise RuntimeError(f"add_rmsnorm failed (code {rc}) for {a.shape}")
    return s, out


def silu_mul(gate_up: np.ndarray, isa: str | None = None) -> np.ndarray:
    """SiLU(gate) * up for gate_up = [gate | up] on the last axis (float32 [..., 2H]) -> float32 [..., H]."""
    width = gate_up.shape[-1] if isinstance(gate_up, np.ndarray) and gate_up.ndim else 0
    if width % 2:
        raise ValueError(f"silu_mul: the last axis must hold gate and up, two equal halves; got {gate_up.shape}")
    gate_up = _rows("silu_mul: gate_up", gate_up, width)
    h = width // 2
    out = np.empty(gate_up.shape[:-1] + (h,), dtype=np.float32)
    rows = out.size // h if h else 0
    if rows:
        rc = _lib().sdk_silu_mul(_address(gate_up), rows, h, _address(out), _isa_code(isa, "silu_mul"))
        if rc != 0:
            raise RuntimeError(f"silu_mul failed (code {rc}) for {gate_up.shape}, isa {isa}")
    return out


def attention(
    qkv: np.ndarray,
    heads: tuple[int, int],
    cos: np.ndarray,
    sin: np.ndarray,
    past: tuple[np.ndarray, np.ndarray],
    mask: np.ndarray,
    scales: tuple[float, float],
    isa: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One LLaMA-style attention step over a KV cache (sparse_cpu.c ``sdk_attention``): (out, present_k, present_v).

    qkv float32 [B, S, (hq + 2 hkv) d] for heads = (hq, hkv); cos, sin float32 [1 or B, S, d] (rotary, half-rotation);
    past = (k, v) float32 [B, hkv, P, d] (P may be 0); mask bool [1 or B, 1 or S, >= P + S] (True: the key may be
    attended); scales = (q, k): the factors the scores' two sides are multiplied by. out [B, S, hq d], present
    [B, hkv, P + S, d]. A query that may attend no key gets zeros.
    """
    hq, hkv = heads
    if qkv.ndim != 3 or hq < 1 or hkv < 1 or hq % hkv or qkv.shape[2] % (hq + 2 * hkv):
        raise ValueError(f"attention: qkv {qkv.shape} does not hold q, k, v of {hq} and {hkv} heads")
    b, s, width = qkv.shape
    d = width // (hq + 2 * hkv)
    past_k, past_v = past
    p = past_k.shape[2] if past_k.ndim == 4 else -1
    if past_k.shape != (b, hkv, p, d) or past_v.shape != past_k.shape:
        raise ValueError(f"attention: past {past_k.shape} / {past_v.shape}, expected [{b}, {hkv}, P, {d}]")
    for name, a in (("cos", cos), ("sin", sin)):
        if a.shape not in ((1, s, d), (b, s, d)):
            raise ValueError(f"attention: {name} {a.shape}, expected [1 or {b}, {s}, {d}]")
    if mask.dtype != np.bool_ or mask.ndim != 3 or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, s):
        raise ValueError(
            f"attention: mask must be bool [1 or {b}, 1 or {s}, >= {p + s}], got {mask.dtype} {mask.shape}"
        )
    if mask.shape[2] < p + s:
        raise ValueError(f"attention: mask covers {mask.shape[2]} keys, the step has {p + s}")
    f32 = [np.ascontiguousarray(a, dtype=np.float32) for a in (qkv, cos, sin, past_k, past_v)]
    qkv, cos, sin, past_k, past_v = f32
    if cos.shape != sin.shape:  # one of them per batch row, the other shared
        cos, sin = (np.ascontiguousarray(np.broadcast_to(a, (b, s, d))) for a in (cos, sin))
    mask = np.ascontiguousarray(mask)
    out = np.empty((b, s, hq * d), dtype=np.float32)
    present_k = np.empty((b, hkv, p + s, d), dtype=np.float32)
    present_v = np.empty_like(present_k)
    lm = mask.shape[2]
    rc = _lib().sdk_attention(
        _address(qkv),
        b,
        s,
        hq,
        hkv,
        d,
        _address(cos),
        _address(sin),
        s * d if cos.shape[0] > 1 else 0,
        _address(past_k),
        _address(past_v),
        p,
        _address(mask),
        mask.shape[1] * lm if mask.shape[0] > 1 else 0,
        lm if mask.shape[1] > 1 else 0,
        lm,
        float(scales[0]),
        float(scales[1]),
        _address(out),
        _address(present_k),
        _address(present_v),
        _isa_code(isa, "attention"),
    )
    if rc != 0:
        raise RuntimeError(f"attention failed (code {rc}) for qkv {qkv.shape}, past {past_k.shape}, isa {isa}")
    return out, present_k, present_v
