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


def packed_sizes(report: dict) -> dict:
    """A sparse-cpu export's packed weights: how many, and the file's size against the same export with those
    weights dense (model bytes - packed bytes + their dense bytes). Empty for other targets."""
    packed = report.get("sparse_cpu")
    if not packed:
        return {}
    int8 = packed.get("scaled_int8") or {"weights": [], "packed_bytes": 0, "dense_bytes": 0}
    dense = (
        report["storage"]["model_bytes"]
        - packed["packed_bytes"]
        - int8["packed_bytes"]
        + packed["dense_bytes"]
        + int8["dense_bytes"]
    )
    return {
        "packed_linears": packed["linears"],
        "packed_layout": packed["layout"],
        "int8_weights": len(int8["weights"]),
        "dense_equivalent_bytes": int(dense),
        "size_vs_dense": report["storage"]["model_bytes"] / dense,
    }


def size_text(data: dict) -> str:
    """The model file's size, and for a sparse-cpu export what is packed and the size against dense weights."""
    size = f"{data['model_bytes'] / 2**20:.1f} MiB"
    if "packed_linears" not in data:
        return f"{data['storage']} storage {size}"
    int8 = f", {data['int8_weights']} dense weight(s) as int8 x a scale per 32" if data["int8_weights"] else ""
    return (
        f"{size} = {data['size_vs_dense']:.2f}x the {data['dense_equivalent_bytes'] / 2**20:.1f} MiB of the same "
        f"export with dense weights: {data['packed_linears']} linears in {data['packed_layout']}{int8}"
    )


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
    data.update(packed_sizes(report))
    text = (
        f"exported {report['model']} -> {output} ({report['exporter']}, opset {report['opset']}, target "
        f"{data['target']}, {size_text(data)})"
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
