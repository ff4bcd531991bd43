"""The export report's measures (file sizes, session load time) and its one-line CLI summary."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def measure_load(file: Path, repeats: int = 3) -> float:
    """Median seconds for ONNX Runtime to create a session (either storage)."""
    from sparsedeploy.onnx.storage import session_from_path

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session_from_path(file)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(Path(path).iterdir()) if p.is_file()}


def summary(report: dict, output: Path | str) -> tuple[dict, str]:
    """The one-line CLI summary of an export report (and its JSON form)."""
    verification = report.get("verification")
    data = {
        "output": str(output),
        "exporter": report["exporter"],
        "opset": report["opset"],
        "target": report["target"]["name"],
        "storage": report["storage"]["kind"],
        "model_bytes": report["storage"]["model_bytes"],
        "ort_load_seconds": report["storage"]["ort_load_seconds"],
        "verified": verification is not None,
    }
    text = (
        f"exported {report['model']} -> {output} ({report['exporter']}, opset {report['opset']}, target "
        f"{data['target']}, "
        f"{data['storage']} storage {data['model_bytes'] / 2**20:.1f} MiB)"
    )
    if verification:
        sp, par = verification["sparsity"], verification["parity"]
        data.update(
            {
                "zeros_torch": sp["zeros_torch"],
                "zeros_onnx": sp["zeros_onnx"],
                "linears": sp["linears"],
                "nm_pattern": sp["nm_pattern"],
                "nm_qualifying": sp["nm_qualifying"],
                "max_abs_logit_diff": par["max_abs_diff"],
                "greedy_identical": par["greedy_identical"],
            }
        )
        text += (
            f"; verified: {sp['linears']} linears, zeros {sp['zeros_onnx']} == {sp['zeros_torch']}"
            + (
                f", {sp['nm_qualifying']}/{sp['linears']} satisfy {sp['nm_pattern']} along K"
                if sp["nm_pattern"]
                else ""
            )
            + f", max |delta logits| {par['max_abs_diff']:.2e} ({par['dtype']}), greedy {par['greedy_tokens']} tokens "
            + ("identical" if par["greedy_identical"] else "DIFFER")
        )
    else:
        text += "; not verified (--no-verify)"
    generation = (report.get("deepsparse_form") or {}).get("generation")
    if generation:
        data["deepsparse_greedy_identical"] = generation["identical"]
        tokens = min(r["new_tokens"] for r in generation["prompts"])
        text += f"; DeepSparse graphs (prefill + decode step): greedy {tokens} tokens identical to PyTorch"
    return data, text
