"""Recipes: one YAML file describing prune -> quality gate -> export -> bench, validated before any work.

Every error names the offending key (`prune.sparsity`, `gate.max_ppl_ratio`, ...) on one line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sparsedeploy.bench.config import ENGINES
from sparsedeploy.common.errors import UserError
from sparsedeploy.common.sparsity import SparsitySpec, parse_sparsity
from sparsedeploy.export.config import DTYPES, OPSET_RANGE, STORAGES, TARGETS
from sparsedeploy.prune.choices import ALLOCATIONS, OFFLOAD_MODES
from sparsedeploy.prune.method_options import METHOD_NAMES, check_recipe_options


@dataclass
class CalibrationSection:
    source: str = "gensim-wiki"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0


@dataclass
class PruneSection:
    method: str = "wanda"
    sparsity: str = "0.5"  # fraction of zeros, or N:M
    pattern: str | None = None  # optional N:M restatement; must agree with sparsity
    allocation: str = "uniform"
    options: dict = field(default_factory=dict)  # method options, e.g. {init: wanda, max_cycles: 50} for dsnot


@dataclass
class EvalSection:
    data: str | None = None  # default: the offline WikiText-2 test file when found
    seqlen: int | None = None
    max_windows: int | None = None
    dense: bool = True  # also evaluate the dense model (needed by gate.max_ppl_ratio)


@dataclass
class GateSection:
    max_ppl_ratio: float | None = None  # pruned perplexity / dense perplexity
    max_ppl: float | None = None


@dataclass
class ExportSection:
    enabled: bool = False
    target: str = "ort"
    dtype: str = "float32"
    storage: str = "dense"
    verify: bool = True
    opset: int | None = None


@dataclass
class BenchSection:
    enabled: bool = False
    engine: str = "ort"
    batch: list = field(default_factory=lambda: [1])
    prompt_len: int = 64
    gen_len: int = 16
    threads: int = 1


@dataclass
class Recipe:
    model: str = "smollm2-135m"
    output: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    offload: str = "none"  # none | cpu | disk (see `sparsedeploy prune --offload`)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    prune: PruneSection = field(default_factory=PruneSection)
    eval: EvalSection = field(default_factory=EvalSection)
    gate: GateSection = field(default_factory=GateSection)
    export: ExportSection = field(default_factory=ExportSection)
    bench: BenchSection = field(default_factory=BenchSection)

    @property
    def spec(self) -> SparsitySpec:
        return parse_sparsity(self.prune.sparsity)


def _allowed(tp) -> tuple[type, ...]:
    """The runtime types a field annotation admits (int also fits a float field; None where optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        out: tuple[type, ...] = ()
        for arg in typing.get_args(tp):
            out += _allowed(arg)
        return out
    if tp is float:
        return (float, int)
    if tp is type(None):
        return (type(None),)
    return (origin or tp,)


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe key {where or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise UserError(f"recipe key {path} is unknown: known keys here are {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
            continue
        if key in ("sparsity", "pattern") and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        allowed = _allowed(tp)
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            want = " or ".join(sorted({t.__name__ for t in allowed}))
            raise UserError(f"recipe key {path} must be {want}, got {type(value).__name__} {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def parse_recipe(data: dict) -> Recipe:
    recipe = _build(Recipe, data, "")
    validate(recipe)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist: check the path (examples are in examples/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe {path} is not valid YAML{where}: fix the syntax") from None
    return parse_recipe(data or {})


def _one_of(words) -> str:
    """'a, b or c': the choices of a vocabulary as the recipe's messages list them."""
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _key_error(key: str, problem: str):
    return UserError(f"recipe key {key}: {problem}")


def validate(recipe: Recipe) -> None:
    """Cross-field checks, before any work starts."""
    from sparsedeploy.prune.methods import METHODS, build_method

    try:
        spec = parse_sparsity(recipe.prune.sparsity)
    except UserError as exc:
        raise _key_error("prune.sparsity", str(exc)) from None
    if recipe.prune.pattern is not None:
        try:
            pattern = parse_sparsity(recipe.prune.pattern)
        except UserError as exc:
            raise _key_error("prune.pattern", str(exc)) from None
        if not pattern.is_nm:
            raise _key_error("prune.pattern", f"{recipe.prune.pattern!r} is not N:M (e.g. 2:4)")
        if spec.is_nm and (spec.n, spec.m) != (pattern.n, pattern.m) or abs(spec.ratio - pattern.ratio) > 1e-9:
            raise _key_error(
                "prune.sparsity",
                f"{recipe.prune.sparsity} contradicts prune.pattern {pattern} "
                f"(which is exactly {pattern.ratio:g} sparse): drop one or make them agree",
            )
        recipe.prune.sparsity = str(pattern)
        spec = pattern
    if "+" in recipe.prune.method:  # a method chain: an initial method refined by another, e.g. wanda+dsnot
        init, _, refine = recipe.prune.method.partition("+")
        chains = [f"{i}+{name}" for name, cls in METHODS.items() if cls.refines for i in cls.initial_methods]
        if recipe.prune.method not in chains:
            raise _key_error("prune.method", f"chain {recipe.prune.method!r} is not supported: use {_one_of(chains)}")
        if recipe.prune.options.get("init", init) != init:
            raise _key_error(
                "prune.options.init",
                f"{recipe.prune.options['init']!r} contradicts prune.method {recipe.prune.method!r}",
            )
        recipe.prune.method, recipe.prune.options = refine, {**recipe.prune.options, "init": init}
    if recipe.prune.method not in METHOD_NAMES:
        raise _key_error(
            "prune.method", f"unknown method {recipe.prune.method!r}: choose one of {', '.join(sorted(METHOD_NAMES))}"
        )
    problem = check_recipe_options(recipe.prune.method, recipe.prune.options)
    if problem is not None:
        raise _key_error("prune.options", f"not accepted by {recipe.prune.method}: {problem}")
    try:
        build_method(recipe.prune.method, **recipe.prune.options)
    except TypeError as exc:
        raise _key_error("prune.options", f"not accepted by {recipe.prune.method}: {exc}") from None
    except UserError as exc:
        raise _key_error("prune.options", str(exc)) from None
    if recipe.prune.allocation not in ALLOCATIONS:
        raise _key_error(
            "prune.allocation", f"unknown allocation {recipe.prune.allocation!r}: use {_one_of(ALLOCATIONS)}"
        )
    if recipe.prune.allocation != "uniform" and spec.is_nm:
        raise _key_error(
            "prune.allocation",
            f"{recipe.prune.allocation} needs an unstructured ratio; N:M {spec} is the same in every layer",
        )
    for key, value in (
        ("calibration.nsamples", recipe.calibration.nsamples),
        ("calibration.seqlen", recipe.calibration.seqlen),
        ("eval.seqlen", recipe.eval.seqlen),
        ("eval.max_windows", recipe.eval.max_windows),
    ):
        if value is not None and value < 1:
            raise _key_error(key, f"must be at least 1, got {value}")
    if recipe.gate.max_ppl_ratio is not None:
        if recipe.gate.max_ppl_ratio < 1.0:
            raise _key_error(
                "gate.max_ppl_ratio", f"{recipe.gate.max_ppl_ratio} < 1 would fail every pruned model: use a ratio >= 1"
            )
        if not recipe.eval.dense:
            raise _key_error("gate.max_ppl_ratio", "needs the dense perplexity: set eval.dense: true")
    if recipe.gate.max_ppl is not None and recipe.gate.max_ppl <= 1.0:
        raise _key_error("gate.max_ppl", f"must be above 1, got {recipe.gate.max_ppl}")
    if recipe.dtype not in ("float32", "float16", "bfloat16"):
        raise _key_error("dtype", f"unknown dtype {recipe.dtype!r}: use float32, float16 or bfloat16")
    if recipe.export.target not in TARGETS:
        raise _key_error("export.target", f"unknown target {recipe.export.target!r}: use {_one_of(TARGETS)}")
    if recipe.export.storage not in STORAGES:
        raise _key_error("export.storage", f"unknown storage {recipe.export.storage!r}: use {_one_of(STORAGES)}")
    if recipe.bench.enabled and not recipe.export.enabled and recipe.bench.engine != "torch":
        raise _key_error(
            "bench.enabled",
            f"engine {recipe.bench.engine} benchmarks the exported ONNX model: set export.enabled: true",
        )
    if not all(isinstance(b, int) and b > 0 for b in recipe.bench.batch):
        raise _key_error("bench.batch", f"must be a list of positive integers, got {recipe.bench.batch!r}")
    if recipe.export.dtype not in DTYPES:
        raise _key_error("export.dtype", f"unknown dtype {recipe.export.dtype!r}: use {_one_of(DTYPES)}")
    low, high = OPSET_RANGE
    if recipe.export.opset is not None and not low <= recipe.export.opset <= high:
        raise _key_error("export.opset", f"{recipe.export.opset} is outside {low}..{high} (LLaMA needs >= {low})")
    if recipe.bench.engine not in ENGINES:
        raise _key_error("bench.engine", f"unknown engine {recipe.bench.engine!r}: use {', '.join(ENGINES)}")
    for key, value, low in (
        ("bench.prompt_len", recipe.bench.prompt_len, 1),
        ("bench.gen_len", recipe.bench.gen_len, 0),
        ("bench.threads", recipe.bench.threads, 1),
    ):
        if value < low:
            raise _key_error(key, f"must be at least {low}, got {value}")
    if recipe.offload not in OFFLOAD_MODES:
        raise _key_error("offload", f"unknown offload {recipe.offload!r}: use {_one_of(OFFLOAD_MODES)}")
    device = recipe.device
    if not (device in ("auto", "cpu") or device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
        raise _key_error("device", f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if recipe.bench.enabled and (recipe.bench.engine == "sparse-cpu") != (recipe.export.target == "sparse-cpu"):
        raise _key_error(
            "bench.engine",
            f"bench.engine {recipe.bench.engine} with export.target {recipe.export.target}: the "
            "sparse-cpu engine times a sparse-cpu export and nothing else; set both to sparse-cpu, or "
            "neither",
        )
    if recipe.bench.enabled and recipe.bench.engine == "tensorrt" and device == "cpu":
        raise _key_error(
            "bench.engine", "tensorrt runs on a GPU: set device: auto or cuda, or use bench.engine: ort or deepsparse"
        )
