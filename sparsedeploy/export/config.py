"""What an export may be asked for, in one place: tasks, dtypes, targets (TargetProfile: opset, operator domains,
optimisation levels), storages, exporters, the opset range, and ExportConfig with its validation. The CLI's choices
and the recipe's checks are built from these."""

from __future__ import annotations

from dataclasses import dataclass

from sparsedeploy.common.errors import UserError
from sparsedeploy.onnx.sparse_linear import DOMAIN as SPARSE_LINEAR_DOMAIN
from sparsedeploy.onnx.sparse_linear import MIN_SPARSITY as SPARSE_LINEAR_MIN

TASKS = ("text-generation-with-past", "text-generation")
DTYPES = {"float32": "fp32", "float16": "fp16"}
STORAGES = ("dense", "sparse")
OPTIMIZE_LEVELS = ("none", "basic", "extended", "all")
EXPORTERS = ("auto", "optimum", "torch")
OPSET_RANGE = (14, 21)  # opsets the LLaMA export supports here (>= 14: LLaMA's ops)
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})

# The static forms written for bench (docs/export.md, "Static forms for bench"): the bench engines that time them,
# what each needs (deepsparse also times generations through them), and the options' flags and defaults, which are
# bench's own defaults (--batch 1,8, --prompt-len 128, --gen-len 64) so that export then bench fit.
BENCH_FORM_ENGINES = {"deepsparse": "prefill, decode step, generations", "tensorrt": "prefill, decode step"}
BENCH_FORM_OPTIONS = {
    "bench_batch": (
        "--bench-batch",
        (1, 8),
        "--target deepsparse|tensorrt: batch sizes of the static forms written for bench (comma-separated)",
    ),
    "bench_prompt_len": (
        "--bench-prompt-len",
        128,
        "--target deepsparse|tensorrt: prompt tokens of the static forms written for bench",
    ),
    "bench_gen_len": (
        "--bench-gen-len",
        64,
        "--target deepsparse: new tokens of the generation forms written for bench (0: none)",
    ),
}


@dataclass(frozen=True)
class TargetProfile:
    """What one runtime needs from the exported graph."""

    name: str
    opset: int
    domains: frozenset[str]  # operator domains the runtime accepts
    optimize_levels: tuple[str, ...]  # ORT graph optimisation levels whose output the runtime accepts
    note: str


TARGETS: dict[str, TargetProfile] = {
    "ort": TargetProfile(
        "ort",
        18,
        STANDARD_DOMAINS | {"com.microsoft"},
        ("none", "basic", "extended"),
        "ONNX Runtime: optimum's default opset 18; ORT-specific fused ops allowed",
    ),
    "deepsparse": TargetProfile(
        "deepsparse",
        14,
        STANDARD_DOMAINS,
        ("none", "basic"),
        "DeepSparse 1.8 bundles onnx 1.14 and an old ONNX Runtime: opset 14 (the lowest the "
        "LLaMA export supports), standard ONNX domain only, no com.microsoft ops; its engine aborts on the "
        "full decoder, so the decoder stack it compiles is written beside it, for prefill "
        "and for a decode step with a KV cache (deepsparse_decoder_stack.onnx, "
        "deepsparse_decode_step.onnx, deepsparse_head.npz)",
    ),
    "tensorrt": TargetProfile(
        "tensorrt",
        17,
        STANDARD_DOMAINS,
        ("none", "basic"),
        "TensorRT: opset 17, standard ops only; MatMul weights kept as constants [K, N] so "
        "--sparsity=enable sees the 2:4 groups along K",
    ),
    "sparse-cpu": TargetProfile(
        "sparse-cpu",
        18,
        STANDARD_DOMAINS | {SPARSE_LINEAR_DOMAIN},
        ("none", "basic"),
        "sparsedeploy's own CPU kernels: every decoder MatMul with at least "
        f"{SPARSE_LINEAR_MIN:.0%} zeros becomes a SparseLinear node ({SPARSE_LINEAR_DOMAIN}) that "
        "carries its weight only in the bitmask16 format (q/k/v and gate/up fused); ONNX Runtime "
        "runs the other operators between them (docs/sparse_cpu.md); float32",
    ),
}

# Optimisation levels refused whatever the target, with the reason shown to the user.
REFUSED_LEVELS = {
    "all": (
        "ONNX Runtime's 'all' level adds layout optimisations (NCHWc) that it marks hardware specific when saved: "
        "the file would be valid only on this CPU type; ORT applies them itself at load time anyway, so export with "
        "--optimize none, basic or extended"
    ),
}


@dataclass
class ExportConfig:
    model: str  # a pruned checkpoint directory (or anything sparsedeploy.common.models can resolve)
    task: str = "text-generation-with-past"
    dtype: str = "float32"
    opset: int | None = None  # None: the target's opset
    target: str = "ort"
    storage: str = "dense"
    optimize: str = "none"  # ORT graph optimisation applied offline before saving
    exporter: str = "auto"  # auto: optimum when it knows the architecture, else torch.onnx
    verify: bool = True
    prompts: tuple[str, ...] = ()  # empty: onnx_verify.DEFAULT_PROMPTS
    decode_steps: int = 4
    greedy_tokens: int = 32
    atol: float | None = None  # None: 1e-4 for float32, the measured bound for float16
    external_data: bool | None = None  # None: only when the model is over 2 GB
    cache_dir: str | None = None
    deepsparse_batch: int = 1  # --target deepsparse: static shapes of the decoder-stack graph written beside the export
    deepsparse_seq: int = 128
    deepsparse_context: int = 256  # KV-cache slots of the decode-step graph: prompt + new tokens - 1 must fit
    # the static forms written for bench: None writes the target's (deepsparse, tensorrt), "none" none
    bench_forms: str | None = None
    bench_batch: tuple[int, ...] = BENCH_FORM_OPTIONS["bench_batch"][1]
    bench_prompt_len: int = BENCH_FORM_OPTIONS["bench_prompt_len"][1]
    bench_gen_len: int = BENCH_FORM_OPTIONS["bench_gen_len"][1]


def bench_forms_engine(config: ExportConfig) -> str | None:
    """The bench engine whose static forms this export writes, if any."""
    if config.bench_forms is None:
        return config.target if config.target in BENCH_FORM_ENGINES else None
    return None if config.bench_forms == "none" else config.bench_forms


def validate(config: ExportConfig) -> TargetProfile:
    choices = {
        "task": TASKS,
        "dtype": tuple(DTYPES),
        "target": tuple(TARGETS),
        "storage": STORAGES,
        "optimize": OPTIMIZE_LEVELS,
        "exporter": EXPORTERS,
    }
    for key, allowed in choices.items():
        value = getattr(config, key)
        if value not in allowed:
            raise UserError(f"--{key} {value!r} is not supported: choose one of {', '.join(allowed)}")
    target = TARGETS[config.target]
    if config.optimize in REFUSED_LEVELS:
        raise UserError(f"refusing --optimize {config.optimize}: {REFUSED_LEVELS[config.optimize]}")
    if config.optimize not in target.optimize_levels:
        raise UserError(
            f"refusing --optimize {config.optimize} for --target {target.name}: that level fuses nodes into "
            f"com.microsoft operators {target.name} does not run; use --optimize {' or '.join(target.optimize_levels)}"
        )
    low, high = OPSET_RANGE
    if config.opset is not None and not low <= config.opset <= high:
        raise UserError(
            f"--opset {config.opset} is outside what the exporter supports here: use {low}..{high} (LLaMA needs >= "
            f"{low})"
        )
    if config.storage == "sparse" and config.target != "ort":
        raise UserError(
            f"--storage sparse is readable only through sparsedeploy's loader, not by {target.name}: use --storage "
            "dense"
        )
    if config.target == "sparse-cpu" and config.dtype != "float32":
        raise UserError(
            f"--dtype {config.dtype} with --target sparse-cpu: its kernels compute in float32; use --dtype float32"
        )
    if config.decode_steps < 1 or config.greedy_tokens < 1:
        raise UserError("--decode-steps and --greedy-tokens must be at least 1")
    if config.deepsparse_batch < 1 or config.deepsparse_seq < 1:
        raise UserError("--deepsparse-batch and --deepsparse-seq must be at least 1")
    if config.deepsparse_context < config.deepsparse_seq:
        raise UserError(
            f"--deepsparse-context {config.deepsparse_context} is smaller than --deepsparse-seq "
            f"{config.deepsparse_seq}: "
            f"the decode step's cache must hold a whole prompt; raise --deepsparse-context"
        )
    if config.bench_forms not in (None, "none", *BENCH_FORM_ENGINES):
        raise UserError(
            f"bench_forms {config.bench_forms!r} is not supported: choose none, {', '.join(BENCH_FORM_ENGINES)}"
        )
    if not config.bench_batch or min(config.bench_batch) < 1 or config.bench_prompt_len < 1 or config.bench_gen_len < 0:
        raise UserError("--bench-batch and --bench-prompt-len must be positive and --bench-gen-len at least 0")
    return target
