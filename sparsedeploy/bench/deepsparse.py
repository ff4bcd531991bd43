"""`bench --engine deepsparse`: DeepSparse 1.8 in its own venv -- the full graph tried, the static forms timed
in DeepSparse and in ONNX Runtime, then whole generations through the decoder-stack graphs."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.forms import (
    GENERATION_FORM,
    build_skeletons,
    form_rows,
    free_skeletons,
    generation_bundles,
    static_forms,
)
from sparsedeploy.bench.report import phase_rows
from sparsedeploy.common.timing import Interleaved, run_interleaved
from sparsedeploy.onnx.storage import session_from_path

log = logging.getLogger(__name__)


def bench_deepsparse(cfg: BenchConfig, variants: dict[str, Path], progress=None) -> tuple[list[dict], dict]:
    from sparsedeploy.runtimes import deepsparse_env as ds

    notes: dict = {"full_graph": {}}
    # Every form looked up before anything is timed: a form the exports did not write stops here, with the fix.
    with tempfile.TemporaryDirectory(prefix="sd-deepsparse-forms-") as tmp:
        forms = static_forms(cfg, variants, Path(tmp), notes)
        bundles = generation_bundles(cfg, variants) if cfg.gen_len > 0 else None
        env = ds.require_env(cfg.deepsparse_venv, cfg.cache_dir)
        rows = time_forms(env, cfg, variants, forms, bundles, notes, progress)
    return rows, notes


def time_forms(env, cfg: BenchConfig, variants: dict[str, Path], forms, bundles, notes: dict, progress) -> list[dict]:
    from sparsedeploy.runtimes import deepsparse_env as ds

    rows: list[dict] = []
    # 1. The full graph, as exported: report whether DeepSparse accepts it.
    first = next(iter(variants.values()))
    try:
        info = ds.check_model(env, first, batch=1, threads=cfg.threads)
        notes["full_graph"] = {"runs": True, **info}
        log.warning(
            "DeepSparse compiled the full graph %s with static shapes; this release still times the decoder stack",
            first,
        )
    except ds.EngineFailed as exc:
        notes["full_graph"] = {"runs": False, "reason": str(exc), "stderr": exc.stderr_tail[-500:]}
        log.info(
            "DeepSparse rejects the full graph with static shapes (%s): timing the decoder stack / linear skeleton", exc
        )
    # 2. Prefill and a decode step on the decoder stack (or the linear skeleton), each timed in DeepSparse
    #    and, on the same graph, in ONNX Runtime.
    from sparsedeploy.bench.matmul_cpu import time_ort_static

    for form in forms:
        if not form.stack:
            build_skeletons(form, variants, notes)
        for engine in ("deepsparse", "ort"):
            if engine == "deepsparse":
                times = ds.bench_models(
                    env,
                    form.paths,
                    form.batch if form.stack else form.rows,
                    cfg.threads,
                    rounds=max(cfg.rounds, 3),
                    per_round=3,
                    min_sample_s=0.02,
                )["times"]
            else:
                times = time_ort_static(form.paths, cfg.threads, max(cfg.rounds, 3), 3)
            rows.extend(form_rows(form, times, engine, cfg, progress))
        free_skeletons(form)
    # 3. Whole generations (prompt + gen_len tokens) through both stack graphs with the embedding lookup and
    #    lm_head around them: the complete model as DeepSparse runs it, and ONNX Runtime on the same files.
    if bundles:
        for batch in cfg.batches:
            reply = ds.bench_generation(
                env,
                bundles[batch],
                batch,
                cfg.prompt_len,
                cfg.gen_len,
                cfg.threads,
                rounds=cfg.rounds,
                per_round=cfg.per_round,
                warmup=cfg.warmup,
            )
            for engine, res in (
                ("deepsparse", Interleaved(times=reply["times"], phases=reply["phases"])),
                ("ort", time_ort_generation(bundles[batch], cfg, batch)),
            ):
                new = phase_rows(res, list(variants), batch, cfg.prompt_len, cfg.gen_len, GENERATION_FORM, engine)
                rows.extend(new)
                if progress:
                    progress(new)
    elif cfg.gen_len > 0:
        notes["generation"] = (
            "not timed: the exports list no decoder-stack forms (export_report.json static_forms); export both "
            "with --target deepsparse"
        )
    return rows


def time_ort_generation(bundles: dict[str, dict[str, Path]], cfg: BenchConfig, batch: int) -> Interleaved:
    """ONNX Runtime running the same stack files and NumPy glue as the DeepSparse generation rows (NumPy's BLAS
    held to --threads, as the DeepSparse worker's is through OMP_NUM_THREADS)."""
    from threadpoolctl import threadpool_limits

    from sparsedeploy.runtimes.decoder_stack import StackHead, generation_phases, random_prompt, session_graph

    runners = {}
    for name, files in bundles.items():
        head = StackHead.load(files["head"])
        graphs = [session_graph(session_from_path(files[kind], threads=cfg.threads)) for kind in ("prefill", "step")]
        ids = random_prompt(head, cfg.prompt_len)
        runners[name] = lambda h=head, g=graphs, i=ids: generation_phases(h, g[0], g[1], i, cfg.gen_len)
    with threadpool_limits(limits=cfg.threads, user_api="blas"):
        return run_interleaved(runners, rounds=cfg.rounds, per_round=cfg.per_round, warmup=cfg.warmup)
