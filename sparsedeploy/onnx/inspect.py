"""`sparsedeploy inspect`: per-weight shape, sparsity and N:M compliance of an ONNX file, with an optional
polygraphy cross-check of the 2:4 verdict."""

from __future__ import annotations

from pathlib import Path

from sparsedeploy.common.sparsity import nm_violations
from sparsedeploy.onnx.graph import Graph


def inspect_onnx(path: Path | str, nm: tuple[int, int] = (2, 4), min_dims: int = 2) -> dict:
    """Per-weight shape, sparsity and N:M compliance (MatMul/Gemm weights, along K) of an ONNX model."""
    from sparsedeploy.onnx.storage import load_model_proto, onnx_file

    file = onnx_file(path)
    model = load_model_proto(file)
    graph = Graph(model)
    matmul = {w.source: w for w in graph.matmul_weights()}
    rows, total, zeros = [], 0, 0
    for name in graph.initializers:
        array = graph.array(name)
        if array.ndim < min_dims or array.dtype.kind != "f":
            continue
        z = int((array == 0).sum())
        total, zeros = total + array.size, zeros + z
        row = {
            "name": name,
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "zeros": z,
            "sparsity": z / array.size,
            "used_by": None,
            "nm_ok": None,
            "nm_reason": None,
        }
        if name in matmul:
            weight = matmul[name]
            row["used_by"] = f"{weight.op} {weight.node}"
            row["nm_ok"], row["nm_reason"] = nm_violations(weight.matrix, *nm)
        rows.append(row)
    matmul_rows = [r for r in rows if r["used_by"]]
    domains = sorted({n.domain or "ai.onnx" for n in model.graph.node})
    summary = {
        "model": str(file),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "domains": domains,
        "weights": len(rows),
        "total_elements": total,
        "zeros": zeros,
        "sparsity": zeros / max(total, 1),
        "matmul_weights": len(matmul_rows),
        "nm_pattern": f"{nm[0]}:{nm[1]}",
        "nm_qualifying": sum(bool(r["nm_ok"]) for r in matmul_rows),
        "file_bytes": _size_on_disk(file),
        "rows": rows,
    }
    summary["polygraphy"] = polygraphy_check(file, summary)
    return summary


def _size_on_disk(file: Path) -> int:
    from sparsedeploy.onnx.storage import SPARSE_FILE, external_data_path

    size = file.stat().st_size
    for extra in (external_data_path(file), file.parent / SPARSE_FILE):
        if extra.is_file():
            size += extra.stat().st_size
    return size


def polygraphy_check(file: Path, summary: dict) -> dict | None:
    """Run `polygraphy inspect sparsity` (2:4 along K) when polygraphy is installed; compare its verdict with ours."""
    import importlib.util
    import re
    import shutil
    import subprocess
    import sys

    from sparsedeploy.onnx.storage import SPARSE_FILE

    if importlib.util.find_spec("polygraphy") is None:
        return None
    if summary["nm_pattern"] != "2:4":
        return {"available": True, "ran": False, "error": "polygraphy checks 2:4 only"}
    if (file.parent / SPARSE_FILE).is_file():
        return {"available": True, "ran": False, "error": "sparse storage: polygraphy reads only plain ONNX files"}
    exe = Path(sys.executable).with_name("polygraphy")
    exe = str(exe) if exe.is_file() else shutil.which("polygraphy")
    if exe is None:
        return {"available": True, "ran": False, "error": "the polygraphy command is not on PATH"}
    proc = subprocess.run([exe, "inspect", "sparsity", str(file)], capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {
            "available": True,
            "ran": False,
            "error": text.strip().splitlines()[-1] if text.strip() else f"exit {proc.returncode}",
        }
    theirs = set(re.findall(r"Found sparse tensor: (\S+)", text))
    checked = theirs | set(re.findall(r"Found non-sparse tensor: (\S+)", text))
    ours = {r["name"] for r in summary["rows"] if r["nm_ok"]}
    ours_checked = {r["name"] for r in summary["rows"] if r["nm_ok"] is not None}
    return {
        "available": True,
        "ran": True,
        "polygraphy_2_4_weights": len(theirs),
        "ours_2_4_weights": len(ours),
        "polygraphy_checked": len(checked),
        "ours_checked": len(ours_checked),
        "agree": theirs == ours,
        "only_polygraphy": sorted(theirs - ours),
        "only_ours": sorted(ours - theirs),
    }


def format_inspect(data: dict, all_weights: bool = False) -> str:
    """The inspect table: one row per weight, then totals."""
    rows = [r for r in data["rows"] if all_weights or r["used_by"]]
    width = max([len(r["name"]) for r in rows] + [6])
    lines = [f"{'weight':<{width}}  {'shape':>14}  {'dtype':>8}  {'sparsity':>8}  {data['nm_pattern']:>5}  used by"]
    for r in rows:
        nm = "-" if r["nm_ok"] is None else ("yes" if r["nm_ok"] else "no")
        lines.append(
            f"{r['name']:<{width}}  {'x'.join(map(str, r['shape'])):>14}  {r['dtype']:>8}  {r['sparsity']:>8.4f}  "
            f"{nm:>5}  {r['used_by'] or ''}"
        )
    lines.append(
        f"total: {data['weights']} weights, {data['total_elements']} elements, sparsity {data['sparsity']:.4f}; "
        f"{data['nm_qualifying']}/{data['matmul_weights']} MatMul/Gemm weights satisfy {data['nm_pattern']} along K; "
        f"opset {data['opset']}; domains {', '.join(data['domains'])}; {data['file_bytes'] / 2**20:.2f} MiB on disk"
    )
    poly = data.get("polygraphy")
    if poly is None:
        lines.append("polygraphy: not installed (pip install polygraphy to cross-check the 2:4 verdict)")
    elif not poly.get("ran"):
        lines.append(f"polygraphy: failed to run: {poly.get('error')}")
    else:
        lines.append(
            f"polygraphy: {poly['polygraphy_2_4_weights']} weights 2:4 sparse vs ours {poly['ours_2_4_weights']}: "
            + ("agree" if poly["agree"] else "DISAGREE")
        )
    return "\n".join(lines)
