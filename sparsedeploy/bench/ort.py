"""`bench --engine ort`: the export with its KV cache in ONNX Runtime, prefill and greedy decode timed."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.report import phase_rows
from sparsedeploy.common.errors import UserError
from sparsedeploy.common.timing import run_interleaved
from sparsedeploy.onnx.decoder import OnnxDecoder

log = logging.getLogger(__name__)


class OrtCausalLM:
    """Greedy generation timed per phase, run by the one causal-LM decoder runner (onnx.decoder.OnnxDecoder)."""

    def __init__(
        self, path: Path, threads: int, last_logits: bool = False, custom_op_library: str | None = None
    ) -> None:
        self.decoder = OnnxDecoder.load(
            path, threads=threads, last_logits=last_logits, custom_op_library=custom_op_library
        )
        self.path, self.session = self.decoder.path, self.decoder.session
        if not self.decoder.with_past:
            raise UserError(
                f"{path} has no past_key_values inputs: export with KV cache (task text-generation-with-past) to time "
                "decode"
            )
        self.vocab = self._vocab_size()

    def _vocab_size(self) -> int:
        """Token ids must stay inside the embedding: the logits' static width, else config.json beside the model."""
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if logits is not None and isinstance(logits.shape[-1], int):
            return logits.shape[-1]
        config = self.path.parent / "config.json"
        if config.is_file():
            import json

            vocab = json.loads(config.read_text()).get("vocab_size")
            if isinstance(vocab, int) and vocab > 0:
                return vocab
        raise UserError(
            f"{self.path}: cannot tell the vocabulary size (no static logits width, no config.json beside it)"
        )

    def generate(self, batch: int, prompt_len: int, gen_len: int, seed: int = 0) -> dict[str, float]:
        """Prefill `prompt_len` random tokens then decode `gen_len` greedy tokens; returns seconds per phase."""
        ids = np.random.default_rng(seed).integers(
            min(10, self.vocab - 1), self.vocab, size=(batch, prompt_len), dtype=np.int64
        )
        mask = np.ones((batch, prompt_len), dtype=np.int64)
        t0 = time.perf_counter()
        logits, past = self.decoder.run(ids, mask, None)
        t1 = time.perf_counter()
        for step in range(gen_len):
            nxt = logits[:, -1, :].argmax(-1).astype(np.int64)[:, None]
            mask = np.ones((batch, prompt_len + step + 1), dtype=np.int64)
            logits, past = self.decoder.run(nxt, mask, past)
        t2 = time.perf_counter()
        return {"prefill": t1 - t0, "decode": t2 - t1, "total": t2 - t0}


def load_models(
    cfg: BenchConfig, variants: dict[str, Path], libraries: dict[str, str] | None = None
) -> tuple[dict[str, OrtCausalLM], str]:
    """Every variant computing the same logits: the last position's (what greedy generation reads, as the
    DeepSparse runner and serving runtimes do) unless ``--all-logits``, or every position's in all of them when one
    graph's lm_head cannot be cut. libraries: variant -> the custom-op library its session registers.
    -> (models, what the form names: "last-position logits" / "all logits")."""
    last = not cfg.all_logits
    libraries = libraries or {}

    def load(name: str, last_logits: bool) -> OrtCausalLM:
        return OrtCausalLM(variants[name], cfg.threads, last_logits, libraries.get(name))

    models = {name: load(name, last) for name in variants}
    if last and not all(m.decoder.last_logits for m in models.values()):
        log.warning("not every model's lm_head can be cut to the last position: timing every position's logits in all")
        # the ones already computing every position's logits are kept as loaded
        models = {n: load(n, False) if m.decoder.last_logits else m for n, m in models.items()}
        last = False
    return models, "last-position logits" if last else "all logits"


def bench_ort(cfg: BenchConfig, variants: dict[str, Path], progress=None) -> list[dict]:
    models, logits = load_models(cfg, variants)
    return time_generations(cfg, models, f"full model with KV cache (optimum export); {logits}", "ort", progress)


def time_generations(
    cfg: BenchConfig, models: dict[str, OrtCausalLM], form: str, engine: str, progress=None
) -> list[dict]:
    """Whole generations of every model, interleaved per batch size: the rows of one table."""
    rows = []
    for batch in cfg.batches:
        runners = {name: (lambda m=m: m.generate(batch, cfg.prompt_len, cfg.gen_len)) for name, m in models.items()}
        res = run_interleaved(
            runners, rounds=cfg.rounds, per_round=cfg.per_round, warmup=cfg.warmup, max_seconds=cfg.max_seconds
        )
        new = phase_rows(res, list(models), batch, cfg.prompt_len, cfg.gen_len, form, engine)
        rows.extend(new)
        if progress:
            progress(new)
    return rows
