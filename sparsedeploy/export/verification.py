"""Checks around an export: a warning when the checkpoint holds no zero at all, and the proof an export keeps
every zero (N:M along K included) and matches PyTorch (:mod:`sparsedeploy.onnx.verify`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sparsedeploy.export.config import ExportConfig

log = logging.getLogger(__name__)


def warn_if_no_zeros(model_dir: Path) -> int:
    """Warn when the checkpoint's 2-D weights hold no zero at all (not pruned?); return the zero count."""
    from safetensors import safe_open

    from sparsedeploy.common.models import corrupt_safetensors

    zeros = 0
    try:
        for file in sorted(Path(model_dir).glob("*.safetensors")):
            if file.name.startswith("masks"):
                continue
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    if key.endswith(".weight") and len(handle.get_slice(key).get_shape()) == 2 and "embed" not in key:
                        zeros += int((handle.get_tensor(key) == 0).sum())
    except Exception:  # noqa: BLE001 - name the unreadable file
        corrupt_safetensors(model_dir)
        raise
    if zeros == 0:
        log.warning(
            "%s has no zero weights at all: it does not look pruned (export a `sparsedeploy prune` output to "
            "get a sparse model)",
            model_dir,
        )
    return zeros


def verify_export(config: ExportConfig, model_dir: Path, onnx_path: Path, opset: int | None = None) -> dict:
    """Sparsity equality (+ N:M along K) and PyTorch/ORT parity of an export; `ok` and `problems` summarise."""
    from sparsedeploy.onnx.storage import load_model_proto
    from sparsedeploy.onnx.verify import DEFAULT_PROMPTS, checkpoint_reference, verify_parity, verify_sparsity

    np_dtype = np.float16 if config.dtype == "float16" else np.float32
    reference, masks, nm = checkpoint_reference(model_dir, np_dtype)
    model = load_model_proto(onnx_path)
    sparsity = verify_sparsity(model, reference, masks, nm)
    del model
    parity = verify_parity(
        model_dir, onnx_path, config.prompts or DEFAULT_PROMPTS, config.decode_steps, config.greedy_tokens, config.atol
    )
    problems = list(sparsity.problems)
    if parity.max_abs_diff > parity.atol:
        problems.append(
            f"logits differ from PyTorch by up to {parity.max_abs_diff:.3g} (> {parity.atol:g} for {parity.dtype})"
        )
    if not parity.greedy_identical:
        message = f"greedy continuations of {parity.greedy_tokens} tokens differ between PyTorch and ONNX Runtime"
        if parity.dtype == "float32":
            problems.append(message)
        else:
            log.warning("%s (float16: reported, not a failure)", message)
    return {
        "ok": sparsity.ok and parity.ok,
        "problems": problems,
        "sparsity": sparsity.to_dict(),
        "parity": parity.to_dict(),
    }
