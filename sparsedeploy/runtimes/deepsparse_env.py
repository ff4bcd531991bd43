"""DeepSparse in its own virtualenv, driven through a subprocess worker (JSON in, JSON out).

DeepSparse is end-of-life: 1.8.0 is the last working release. It needs Python <= 3.11, Linux on x86-64
with AVX2 or AVX-512 (or ARM64), and pins onnx 1.14 and numpy < 2, which clash with the main
environment. So `sparsedeploy engines install deepsparse` builds a separate virtualenv under the
sparsedeploy cache directory and the main process only ever talks to it through
``deepsparse_worker.py`` over stdin/stdout.

Safety rules kept here:
- ``NM_DISABLE_ANALYTICS=1`` is always set for the worker (sparsezoo phones home otherwise).
- The worker only ever sees *copies* of the user's ONNX files (``deepsparse.benchmark -e onnxruntime``
  is known to overwrite its input model in place; we never call it on a user's file).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sparsedeploy.common.errors import UserError

log = logging.getLogger(__name__)

DEEPSPARSE_VERSION = "1.8.0"
# deepsparse 1.8.0 itself pins onnx<=1.14.1 and numpy<2; naming them keeps pip from backtracking.
REQUIREMENTS = [f"deepsparse=={DEEPSPARSE_VERSION}", "onnx==1.14.1", "numpy<2"]
MAX_PYTHON = (3, 11)
MIN_PYTHON = (3, 8)
LICENCE_NOTE = (
    "DeepSparse 1.8.0 (Neural Magic, end-of-life) is under the Neural Magic DeepSparse Community "
    "License: evaluation, research and non-production use only. Figures measured with it are for "
    "orientation; production use needs a separate licence."
)
WORKER = Path(__file__).with_name("deepsparse_worker.py")
MARKER = ".sparsedeploy-complete"


class EngineFailed(RuntimeError):
    """The DeepSparse worker died or reported an error (e.g. the engine aborted on a graph)."""

    def __init__(self, message: str, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.stderr_tail = stderr_tail


def default_venv_dir(cache: str | os.PathLike | None = None) -> Path:
    """$SPARSEDEPLOY_DEEPSPARSE_VENV (e.g. baked into an image), else CACHE/engines/deepsparse-VERSION."""
    from sparsedeploy.common.models import cache_dir

    if os.environ.get("SPARSEDEPLOY_DEEPSPARSE_VENV"):
        return Path(os.environ["SPARSEDEPLOY_DEEPSPARSE_VENV"])
    return cache_dir(cache) / "engines" / f"deepsparse-{DEEPSPARSE_VERSION}"


# ----------------------------------------------------------------------------------------------
# Can DeepSparse run here?
# ----------------------------------------------------------------------------------------------


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty when it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def platform_problem(
    system: str | None = None, machine: str | None = None, flags: set[str] | None = None
) -> str | None:
    """Why DeepSparse 1.8 cannot run on this OS/CPU, or None when it can."""
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    if system != "Linux":
        return (
            f"DeepSparse 1.8 ships Linux wheels only (this is {system}): "
            "run the DeepSparse benchmark on a Linux x86-64 or ARM64 machine, or use --engine ort"
        )
    if machine in ("aarch64", "arm64"):
        return None
    if machine not in ("x86_64", "amd64"):
        return f"DeepSparse 1.8 supports x86-64 (AVX2/AVX-512) and ARM64 CPUs, not {machine}: use --engine ort"
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None  # cannot tell; let pip/deepsparse decide
    if "avx2" not in flags and "avx512f" not in flags:
        return "this x86-64 CPU has neither AVX2 nor AVX-512, which DeepSparse 1.8 requires: use --engine ort"
    return None


def python_version_of(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        major, minor = out.stdout.split()
        return int(major), int(minor)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def find_python(explicit: str | None = None) -> str:
    """A Python interpreter DeepSparse 1.8 supports (3.8-3.11): --python, this one, or python3.11..3.8 on PATH."""
    if explicit:
        version = python_version_of(explicit)
        if version is None:
            raise UserError(f"--python {explicit} could not be run: give the path of a Python 3.8-3.11 interpreter")
        if not MIN_PYTHON <= version <= MAX_PYTHON:
            raise UserError(
                f"--python {explicit} is Python {version[0]}.{version[1]}, but DeepSparse 1.8 needs 3.8-3.11: install "
                "python3.11 and pass --python python3.11"
            )
        return explicit
    if MIN_PYTHON <= sys.version_info[:2] <= MAX_PYTHON:
        return sys.executable
    for minor in (11, 10, 9, 8):
        found = shutil.which(f"python3.{minor}")
        if found:
            return found
    raise UserError(
        f"DeepSparse 1.8 needs Python 3.8-3.11 and this is {sys.version_info[0]}.{sys.version_info[1]} with no "
        "python3.11..3.8 on PATH: "
        "install python3.11 (e.g. apt-get install python3.11-venv) and pass --python /path/to/python3.11"
    )


# ----------------------------------------------------------------------------------------------
# Install / locate
# ----------------------------------------------------------------------------------------------


@dataclass
class DeepSparseEnv:
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def is_complete(self) -> bool:
        return (self.path / MARKER).is_file() and self.python.exists()


def find_env(venv: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> DeepSparseEnv | None:
    env = DeepSparseEnv(Path(venv) if venv else default_venv_dir(cache))
    return env if env.is_complete() else None


def require_env(venv: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> DeepSparseEnv:
    """The installed DeepSparse venv, or a UserError saying why it cannot be used and what to do."""
    problem = platform_problem()
    if problem:
        raise UserError(problem)
    env = find_env(venv, cache)
    if env is None:
        where = Path(venv) if venv else default_venv_dir(cache)
        raise UserError(
            f"DeepSparse is not installed (no complete virtualenv at {where}): run `sparsedeploy engines install "
            "deepsparse` "
            "(needs Python 3.8-3.11 and PyPI access), or use --engine ort"
        )
    return env


def install(
    venv: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    python: str | None = None,
    force: bool = False,
    pip_args: list[str] | None = None,
) -> DeepSparseEnv:
    """Create the virtualenv and pip-install DeepSparse 1.8.0 into it; verify by importing it in the worker."""
    problem = platform_problem()
    if problem:
        raise UserError(problem)
    env = DeepSparseEnv(Path(venv) if venv else default_venv_dir(cache))
    if env.is_complete() and not force:
        log.info("DeepSparse %s already installed at %s", DEEPSPARSE_VERSION, env.path)
        return env
    interpreter = find_python(python)
    from sparsedeploy.common.files import check_writable, has_marker, write_marker

    if env.path.exists() and (not env.path.is_dir() or any(env.path.iterdir())):
        if not has_marker(env.path):  # sparsedeploy deletes only what it created
            raise UserError(
                f"--venv {env.path} exists and was not created by sparsedeploy: refusing to replace it; "
                "choose another --venv or remove it yourself"
            )
        shutil.rmtree(env.path)
    check_writable(env.path, "--venv")
    env.path.mkdir(parents=True, exist_ok=True)
    write_marker(env.path, "deepsparse-venv")
    try:
        log.info("creating virtualenv %s with %s", env.path, interpreter)
        _run(
            [interpreter, "-m", "venv", str(env.path)],
            "create the virtualenv (is the venv module installed? e.g. apt-get install python3.11-venv)",
        )
        log.info("installing %s (about 1 minute)", " ".join(REQUIREMENTS))
        _run(
            [str(env.python), "-m", "pip", "install", "--quiet", *REQUIREMENTS, *(pip_args or [])],
            "pip install deepsparse (needs PyPI access; see the pip output above)",
        )
        info = call_worker(env, {"action": "info"}, timeout=300)
        log.info("DeepSparse %s works: %s", info.get("deepsparse"), info.get("cpu"))
        (env.path / MARKER).write_text(json.dumps(info) + "\n")
    except BaseException:
        shutil.rmtree(env.path, ignore_errors=True)  # ours (created above): no half-installed venv is left
        raise
    return env


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        sys.stderr.write(tail + "\n")
        raise UserError(f"could not {what}; nothing was installed")


# ----------------------------------------------------------------------------------------------
# Talk to the worker
# ----------------------------------------------------------------------------------------------

# What the worker inherits: nothing else of the main process's environment (no PYTHONPATH, no tokens).
_WORKER_ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")
# The only main-package modules the worker imports (standard library and NumPy only), relative to the package.
WORKER_MODULES = ("common/timing.py", "runtimes/decoder_stack.py")


def worker_env(threads: int | None = None, lib: Path | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _WORKER_ENV_KEEP if k in os.environ}
    env["NM_DISABLE_ANALYTICS"] = "1"
    if lib is not None:
        env["SPARSEDEPLOY_WORKER_LIB"] = str(lib)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def worker_lib(folder: Path) -> Path:
    """A folder holding a `sparsedeploy` package with only the modules the worker needs: the worker puts it on
    sys.path instead of the main package's parent (for a non-editable install that is the main site-packages).
    Every package on the way gets an empty __init__.py: the real ones would import more than the worker needs."""
    source = Path(__file__).resolve().parents[1]
    package = Path(folder) / "sparsedeploy"
    for name in WORKER_MODULES:
        target = package / name
        target.parent.mkdir(parents=True, exist_ok=True)
        folder_in = target.parent
        while folder_in != package.parent:  # sparsedeploy/runtimes/, then sparsedeploy/
            (folder_in / "__init__.py").touch()
            folder_in = folder_in.parent
        shutil.copy2(source / name, target)
    return Path(folder)


def call_worker(env: DeepSparseEnv, request: dict, timeout: float = 1800) -> dict:
    """Run one request in the DeepSparse venv. Raises EngineFailed when the worker crashes or reports an error."""
    with tempfile.TemporaryDirectory(prefix="sd-worker-lib-") as lib:
        # -I: isolated mode (no user site, no PYTHON* variables, not the script's folder on sys.path)
        proc = subprocess.run(
            [str(env.python), "-I", str(WORKER)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=worker_env(request.get("threads"), worker_lib(Path(lib))),
        )
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
    if proc.returncode != 0 or not lines:
        why = _abort_reason(proc.stderr) or f"exit status {proc.returncode}"
        raise EngineFailed(f"DeepSparse worker failed ({why})", tail)
    reply = json.loads(lines[-1])
    if "error" in reply:
        raise EngineFailed(f"DeepSparse: {reply['error']}", tail)
    return reply


def _abort_reason(stderr: str) -> str | None:
    for line in stderr.splitlines():
        if "Assertion" in line or "Error" in line or "error" in line:
            return line.strip()[:300]
    return None


def external_data_files(model: Path) -> list[str]:
    """The external-data files an ONNX model refers to (relative to its folder), read without loading them;
    a location that leaves the model's folder is refused."""
    from sparsedeploy.common.files import safe_external_data

    return safe_external_data(model)


def copy_models(paths: dict[str, Path], workdir: Path) -> dict[str, str]:
    """Copy each ONNX file with exactly the external-data files it refers to into `workdir`: the worker
    never sees user files (and a folder holding several models' data does not get copied whole)."""
    copies = {}
    for i, (name, src) in enumerate(paths.items()):
        src = Path(src)
        dst_dir = workdir / f"m{i}"
        dst_dir.mkdir(parents=True)
        for rel in [src.name, *external_data_files(src)]:
            (dst_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src.parent / rel, dst_dir / rel)
        copies[name] = str(dst_dir / src.name)
    return copies


def bench_models(
    env: DeepSparseEnv,
    models: dict[str, Path],
    batch: int,
    threads: int,
    rounds: int = 5,
    per_round: int = 3,
    warmup: int = 2,
    max_seconds: float | None = None,
    timeout: float = 1800,
    min_sample_s: float = 0.0,
) -> dict:
    """Time several ONNX models alternately in one DeepSparse process; returns {"times": {name: [...]}, ...}."""
    with tempfile.TemporaryDirectory(prefix="sd-deepsparse-") as tmp:
        copies = copy_models(models, Path(tmp))
        return call_worker(
            env,
            {
                "action": "bench",
                "models": copies,
                "batch": batch,
                "threads": threads,
                "rounds": rounds,
                "per_round": per_round,
                "warmup": warmup,
                "max_seconds": max_seconds,
                "min_sample_s": min_sample_s,
            },
            timeout=timeout,
        )


def check_model(env: DeepSparseEnv, model: Path, batch: int, threads: int = 1, timeout: float = 900) -> dict:
    """Compile (and run once) one model in DeepSparse; EngineFailed says why when the engine rejects it."""
    with tempfile.TemporaryDirectory(prefix="sd-deepsparse-") as tmp:
        copies = copy_models({"model": model}, Path(tmp))
        return call_worker(
            env, {"action": "check", "models": copies, "batch": batch, "threads": threads}, timeout=timeout
        )


def bench_generation(
    env: DeepSparseEnv,
    bundles: dict[str, dict[str, Path]],
    batch: int,
    prompt_len: int,
    gen_len: int,
    threads: int,
    rounds: int = 3,
    per_round: int = 1,
    warmup: int = 1,
    timeout: float = 3600,
) -> dict:
    """Time whole generations (stack_generate over each variant's prefill/step graphs and head) alternately in one
    DeepSparse process: {"times": {name: [...]}, "phases": {name: {"prefill"|"decode"|"total": [...]}}, ...}."""
    with tempfile.TemporaryDirectory(prefix="sd-deepsparse-") as tmp:
        graphs = {f"{name}.{kind}": files[kind] for name, files in bundles.items() for kind in ("prefill", "step")}
        copies = copy_models(graphs, Path(tmp))
        models = {
            name: {"prefill": copies[f"{name}.prefill"], "step": copies[f"{name}.step"], "head": str(files["head"])}
            for name, files in bundles.items()
        }
        return call_worker(
            env,
            {
                "action": "bench_generate",
                "models": models,
                "batch": batch,
                "threads": threads,
                "prompt_len": prompt_len,
                "gen_len": gen_len,
                "rounds": rounds,
                "per_round": per_round,
                "warmup": warmup,
            },
            timeout=timeout,
        )


def stack_files(export_dir: Path | str) -> dict[str, Path]:
    """The three files `export --target deepsparse` writes for generation, or a UserError naming the missing ones."""
    from sparsedeploy.runtimes.decoder_stack import HEAD_FILE, PREFILL_FILE, STEP_FILE

    export_dir = Path(export_dir)
    files = {"prefill": export_dir / PREFILL_FILE, "step": export_dir / STEP_FILE, "head": export_dir / HEAD_FILE}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise UserError(
            f"{export_dir} has no {', '.join(missing)}: export with --target deepsparse to get the graphs DeepSparse "
            "runs"
        )
    return files


def generate(
    env: DeepSparseEnv, export_dir: Path, ids, new_tokens: int, threads: int = 1, timeout: float = 1800
) -> dict:
    """Greedy generation in DeepSparse through the decoder-stack files `export --target deepsparse` wrote
    (prefill graph, decode-step graph with KV cache, embedding/lm_head): {"tokens", "timings", "compile_s"}."""
    files = stack_files(export_dir)
    batch = len(ids)
    with tempfile.TemporaryDirectory(prefix="sd-deepsparse-") as tmp:
        copies = copy_models({"prefill": files["prefill"], "step": files["step"]}, Path(tmp))
        return call_worker(
            env,
            {
                "action": "generate",
                "models": copies,
                "head": str(files["head"]),
                "ids": [list(map(int, row)) for row in ids],
                "new_tokens": int(new_tokens),
                "batch": batch,
                "threads": threads,
            },
            timeout=timeout,
        )


def generate_text(
    export_dir: Path | str,
    prompt: str,
    max_new_tokens: int = 32,
    threads: int = 1,
    venv: str | None = None,
    cache: str | None = None,
) -> dict:
    """`sparsedeploy generate --engine deepsparse`: greedy text from an export made with --target deepsparse,
    every decoder block run by DeepSparse's engine (prefill graph, then one decode-step graph per token)."""
    from sparsedeploy.onnx.decoder import load_tokenizer
    from sparsedeploy.runtimes.decoder_stack import StackHead

    export_dir = Path(export_dir)
    export_dir = export_dir.parent if export_dir.is_file() else export_dir
    env = require_env(venv, cache)
    files = stack_files(export_dir)
    tokenizer = load_tokenizer(export_dir)
    if tokenizer is None:
        raise UserError(
            f"no tokenizer in {export_dir}: export from a checkpoint that has one (tokenizer.json / "
            "tokenizer_config.json)"
        )
    head = StackHead.load(files["head"])
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise UserError("the prompt is empty after tokenisation: give some text with --prompt")
    if len(ids) > head.seq:
        raise UserError(
            f"the prompt has {len(ids)} tokens but the DeepSparse prefill graph takes at most {head.seq}: "
            f"shorten it or export with --deepsparse-seq {len(ids)}"
        )
    if max_new_tokens < 1 or len(ids) + max_new_tokens - 1 > head.context:
        raise UserError(
            f"--max-new-tokens {max_new_tokens} with a {len(ids)}-token prompt does not fit the decode step's cache of "
            f"{head.context} slots: use at most {head.context - len(ids) + 1}, or export with a larger "
            "--deepsparse-context"
        )
    reply = generate(env, export_dir, [ids] * head.batch, max_new_tokens, threads)
    tokens = reply["tokens"][0]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
    steps = reply["timings"].get("step", [])
    return {
        "prompt": prompt,
        "completion": tokenizer.decode(tokens, skip_special_tokens=True),
        "tokens": tokens,
        "new_tokens": len(tokens),
        "prefill_seconds": reply["timings"]["prefill"][0],
        "step_seconds": steps,
        "decode_tokens_per_s": len(steps) / sum(steps) if steps else None,
        "compile_seconds": reply["compile_s"],
        "threads": threads,
        "engine": "deepsparse",
        "licence": LICENCE_NOTE,
    }
