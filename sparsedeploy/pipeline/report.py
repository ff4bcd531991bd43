"""REPORT.md, report.json and plots for a pipeline run."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from sparsedeploy.common.files import write_json_atomic

log = logging.getLogger(__name__)


def block_sparsity_table(layers: list[dict]) -> list[dict]:
    """Per-block attention / MLP / total sparsity from the per-linear rows of report.json."""
    acc: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for row in layers:
        part = "attn" if "attn" in row["name"] else "mlp" if "mlp" in row["name"] else "other"
        for key in (part, "total"):
            acc[row["block"]][key][0] += row["zeros"]
            acc[row["block"]][key][1] += row["numel"]
    return [{"block": b, **{k: z / n for k, (z, n) in parts.items()}} for b, parts in sorted(acc.items())]


def plot_sparsity(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'sparsedeploy[bench]')")
        return False
    fig, ax = plt.subplots(figsize=(8, 3.2))
    blocks = [r["block"] for r in rows]
    for key, style in (("attn", "o-"), ("mlp", "s-"), ("total", "k--")):
        if all(key in r for r in rows):
            ax.plot(blocks, [r[key] for r in rows], style, label=key, markersize=3)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity (measured)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_perplexity(stages: dict[str, float], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(list(stages), list(stages.values()), color=["#888", "#3a7"][: len(stages)])
    ax.set_ylabel("perplexity")
    for i, v in enumerate(stages.values()):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(folder: Path, report: dict, prune_report: dict) -> None:
    folder = Path(folder)
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    blocks = block_sparsity_table(prune_report["layers"])
    dense, pruned, gate = report["dense"], report["pruned"], report["gate"]
    ppl = {"dense": dense["ppl"]} if dense else {}
    ppl["pruned"] = pruned["ppl"]
    has_sparsity_plot = plot_sparsity(blocks, plots / "sparsity_per_block.png")
    has_ppl_plot = plot_perplexity(ppl, plots / "perplexity.png")
    recipe = report["recipe"]
    verdict = "PASSED" if gate["passed"] else "FAILED: " + "; ".join(gate["reasons"])
    lines = [
        "# sparsedeploy report",
        "",
        f"Model `{recipe['model']}`, method `{prune_report['method']}` at `{prune_report['sparsity_spec']}` "
        f"(allocation {recipe['prune']['allocation']}), calibration `{prune_report['calibration']['source']}` "
        f"{prune_report['calibration']['nsamples']}x{prune_report['calibration']['seqlen']} seed "
        f"{prune_report['calibration']['seed']}, "
        f"device {prune_report['device']}, {prune_report['versions']['torch_threads']} torch threads.",
        "",
        f"**Quality gate: {verdict}**",
        "",
        "| stage | perplexity | sparsity | windows x seqlen |",
        "|---|---|---|---|",
    ]
    for name, ev in (("dense", dense), ("pruned", pruned)):
        if ev:
            lines.append(f"| {name} | {ev['ppl']:.3f} | {ev['sparsity']:.4f} | {ev['windows']} x {ev['seqlen']} |")
    if dense:
        lines += ["", f"Perplexity ratio pruned/dense: {pruned['ppl'] / dense['ppl']:.3f}."]
    lines += ["", f"Evaluation data: `{pruned['data']}`.", "", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s['name']} | {s['seconds']:.1f} |" for s in report["stages"]]
    lines += [
        "",
        f"Prune: {prune_report['prune_seconds']:.1f} s, peak RSS {prune_report['peak_rss_mib']:.0f} MiB"
        + (f", peak CUDA {prune_report['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in prune_report else "")
        + ".",
    ]
    if has_ppl_plot:
        lines += ["", "![perplexity](plots/perplexity.png)"]
    lines += ["", "## Sparsity per decoder block (measured from the weights)", ""]
    if has_sparsity_plot:
        lines += ["![sparsity per block](plots/sparsity_per_block.png)", ""]
    lines += ["| block | attention | MLP | total |", "|---|---|---|---|"]
    lines += [f"| {b['block']} | {b.get('attn', 0):.4f} | {b.get('mlp', 0):.4f} | {b['total']:.4f} |" for b in blocks]
    lines += ["", f"Overall sparsity of the pruned linears: {prune_report['overall_sparsity']:.6f}."]
    for name in ("export", "bench"):
        section = report["stage_results"].get(name)
        if section and section.get("markdown"):
            lines += ["", f"## {name.capitalize()}", "", section["markdown"]]
    (folder / "REPORT.md").write_text("\n".join(lines) + "\n")
    write_json_atomic(folder / "report.json", {**report, "blocks": blocks})
