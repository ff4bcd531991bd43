"""Running an exported decoder in ONNX Runtime: prefill, decode steps with the KV cache, greedy generation.

The model follows optimum's conventions: inputs ``input_ids``, ``attention_mask``, ``position_ids``
(when present) and ``past_key_values.{i}.key/value``; outputs ``logits`` and ``present.{i}.key/value``.
A graph without past inputs (task ``text-generation``) is run by recomputing the whole sequence.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsedeploy.common.errors import UserError
from sparsedeploy.onnx.dtypes import ORT_TYPES
from sparsedeploy.onnx.last_logits import LastLogitsUnavailable
from sparsedeploy.onnx.storage import onnx_file, session_from_path

log = logging.getLogger(__name__)


@dataclass
class OnnxDecoder:
    session: object
    path: Path
    past_names: list[str] = field(default_factory=list)
    present_names: list[str] = field(default_factory=list)
    past_shape: tuple[int, int] = (0, 0)  # (kv heads, head dim)
    kv_dtype: type = np.float32
    has_position_ids: bool = True
    load_seconds: float = 0.0
    last_logits: bool = False  # `logits` of the last position only ([B, 1, V]; onnx/last_logits.py)

    @property
    def with_past(self) -> bool:
        return bool(self.past_names)

    @classmethod
    def load(
        cls,
        path: Path | str,
        threads: int | None = None,
        optimization: str = "all",
        last_logits: bool = False,
        custom_op_library: Path | str | None = None,
    ) -> OnnxDecoder:
        """last_logits: compute only the last position's logits (what generation reads) where the graph's lm_head
        allows it (`decoder.last_logits` says whether it did); else every position's. custom_op_library: run a
        sparse-cpu export whole in ONNX Runtime with sparsedeploy's custom-op library (storage.session_from_path)."""
        file = onnx_file(path)
        start = time.perf_counter()
        opts = {"threads": threads, "optimization": optimization, "custom_op_library": custom_op_library}
        try:
            session = session_from_path(file, last_logits=last_logits, **opts)
        except LastLogitsUnavailable as exc:
            log.info("%s; every position's logits are computed", exc)
            session, last_logits = session_from_path(file, **opts), False
        elapsed = time.perf_counter() - start
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise UserError(
                    f"{file} has no `{required}` input: not a decoder exported by sparsedeploy/optimum (inputs: "
                    f"{', '.join(inputs)})"
                )
        if "logits" not in outputs:
            raise UserError(f"{file} has no `logits` output: not a causal-LM decoder (outputs: {', '.join(outputs)})")
        past = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_kv_order)
        present = [n.replace("past_key_values.", "present.") for n in past]
        missing = [n for n in present if n not in outputs]
        if missing:
            raise UserError(
                f"{file} takes past_key_values but does not return {missing[0]}: the KV-cache outputs are broken; "
                "export again"
            )
        shape, dtype = (0, 0), np.float32
        if past:
            dims = inputs[past[0]].shape
            if not (isinstance(dims[1], int) and isinstance(dims[3], int)):
                raise UserError(f"{file}: cannot read the KV-cache head shape from {past[0]} {dims}")
            shape, dtype = (dims[1], dims[3]), ORT_TYPES.get(inputs[past[0]].type, np.float32)
        return cls(session, file, past, present, shape, dtype, "position_ids" in inputs, elapsed, last_logits)

    def run(
        self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray] | None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward pass: `ids` are the new tokens, `mask` covers past + new, `past` the cache (None: empty)."""
        batch, new = ids.shape
        past_len = past[0].shape[2] if past else 0
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        if self.has_position_ids:
            positions = np.cumsum(mask, axis=1) - 1
            positions[mask == 0] = 1
            feeds["position_ids"] = positions[:, past_len : past_len + new].astype(np.int64)
        if self.with_past:
            if past is None:
                past = [
                    np.zeros((batch, self.past_shape[0], 0, self.past_shape[1]), self.kv_dtype) for _ in self.past_names
                ]
            feeds.update(dict(zip(self.past_names, past)))
        outputs = self.session.run(["logits", *self.present_names], feeds)
        return outputs[0], list(outputs[1:])

    def greedy(
        self,
        ids: np.ndarray,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        step_logits: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Greedy continuation of `ids` [1, T] using the KV cache (or full recompute without one)."""
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.ones_like(ids)
        logits, past = self.run(ids, mask, None)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            last = logits[:, -1, :].astype(np.float32)
            if step_logits is not None:
                step_logits.append(last)
            token = int(last.argmax(-1)[0])
            generated.append(token)
            if eos_token_id is not None and token == eos_token_id:
                break
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            if self.with_past:
                logits, past = self.run(np.array([[token]], np.int64), mask, past)
            else:
                full = np.concatenate([ids, np.array([generated], np.int64)], axis=1)
                logits, _ = self.run(full, mask, None)
        return np.array(generated, dtype=np.int64)


def _kv_order(name: str) -> tuple[int, int]:
    _, index, kind = name.rsplit(".", 2)
    return int(index), 0 if kind == "key" else 1


def load_tokenizer(directory: Path | str):
    """The tokenizer saved beside an exported model (None when there is none)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError):
        return None


def generate_text(
    onnx_dir: Path | str,
    prompt: str,
    max_new_tokens: int = 32,
    threads: int | None = None,
    engine: str = "ort",
    custom_op_library: Path | str | None = None,
) -> dict:
    """Greedy generation with the KV cache; returns text, token ids and timings. engine "ort": whatever the export
    needs (a sparse-cpu export runs its SparseLinear nodes in sparsedeploy's kernels); "sparse-cpu": refuse an export
    without SparseLinear nodes. custom_op_library: a sparse-cpu export runs whole in ONNX Runtime with it."""
    from sparsedeploy.onnx.segmented import SegmentedSession
    from sparsedeploy.onnx.sparse_linear import DOMAIN
    from sparsedeploy.onnx.storage import load_model_proto

    onnx_dir = Path(onnx_dir)
    decoder = OnnxDecoder.load(onnx_dir, threads=threads, last_logits=True, custom_op_library=custom_op_library)
    sparse_cpu = isinstance(decoder.session, SegmentedSession)
    if custom_op_library is not None:
        kernel_nodes = getattr(decoder.session, "sparsedeploy_kernel_nodes", None)  # counted where the graph was read
        if kernel_nodes is None:
            graph = load_model_proto(decoder.path, load_external=False).graph
            kernel_nodes = sum(n.domain == DOMAIN for n in graph.node)
        sparse_cpu = kernel_nodes > 0
    if engine == "sparse-cpu" and not sparse_cpu:
        raise UserError(
            f"{decoder.path} has no SparseLinear nodes, so nothing would run in sparsedeploy's kernels: "
            "export it with --target sparse-cpu (or use --engine ort)"
        )
    directory = decoder.path.parent
    tokenizer = load_tokenizer(directory)
    if tokenizer is None:
        raise UserError(
            f"no tokenizer beside {decoder.path}: export from a checkpoint that has one (tokenizer.json / "
            "tokenizer_config.json)"
        )
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    ids = np.asarray(tokenizer(prompt, return_tensors="np")["input_ids"], dtype=np.int64)
    if ids.shape[1] == 0:
        raise UserError("the prompt is empty after tokenisation: give some text with --prompt")
    start = time.perf_counter()
    tokens = decoder.greedy(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    elapsed = time.perf_counter() - start
    return {
        "prompt": prompt,
        "completion": tokenizer.decode(tokens, skip_special_tokens=True),
        "tokens": tokens.tolist(),
        "new_tokens": int(tokens.size),
        "seconds": elapsed,
        "load_seconds": decoder.load_seconds,
        "kv_cache": decoder.with_past,
        "model": str(decoder.path),
        "engine": "sparse-cpu" if sparse_cpu else "ort",
        "custom_op_library": str(custom_op_library) if custom_op_library is not None else None,
    }
