"""The bench report: rows per variant and phase with the per-round speedup, bench.md and bench.png."""

from __future__ import annotations

import logging
from pathlib import Path

from sparsedeploy.bench.config import round_trip_note
from sparsedeploy.common.timing import Interleaved, summarize

log = logging.getLogger(__name__)


def phase_rows(
    res: Interleaved, variants: list[str], batch: int, prompt_len: int, gen_len: int, form: str, engine: str
) -> list[dict]:
    """Per variant and phase: median/spread, prefill ms, decode tok/s, and the per-round speedup vs dense."""
    rows = []
    for name in variants:
        for phase, values in res.phases[name].items():
            s = summarize(values)
            row = {
                "engine": engine,
                "form": form,
                "variant": name,
                "batch": batch,
                "phase": phase,
                "median_s": s.median,
                "p10_s": s.p10,
                "p90_s": s.p90,
                "spread": s.spread,
                "noisy": s.noisy,
                "rounds": s.n,
            }
            if phase == "decode" and gen_len:
                row["tokens_per_s"] = batch * gen_len / s.median
            if phase == "prefill":
                row["prompt_tokens_per_s"] = batch * prompt_len / s.median
            if name != "dense" and "dense" in res.phases:
                r = res.phase_ratio("dense", name, phase)
                row.update(speedup=r.median, speedup_p10=r.p10, speedup_p90=r.p90, noisy=bool(row["noisy"] or r.noisy))
            rows.append(row)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# sparsedeploy bench: {result['engine']}",
        "",
        f"- model: `{result['model']}`"
        + (f" vs dense baseline `{result['baseline']}`" if result.get("baseline") else ""),
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; threads: {m['threads']}"
        + (f"; GPU: {m['gpu']} (torch {m.get('torch', '?')})" if m.get("gpu") else "")
        + (f"; {round_trip_note(*m['core_round_trip_ns'])}" if m.get("core_round_trip_ns") else ""),
        f"- prompt {result['prompt_len']} tokens"
        + (
            f", {result['gen_len']} generated"
            if any(r["phase"] == "decode" for r in result["rows"])
            else ", no generation (static forms)"
        )
        + f"; rounds {result['rounds']} (dense and sparse alternating)",
        f"- form measured: {'; '.join(sorted({r['form'] for r in result['rows']}))}",
        "",
    ]
    if result.get("notes", {}).get("full_graph"):
        fg = result["notes"]["full_graph"]
        lines += [
            f"- full graph in DeepSparse: {'runs' if fg.get('runs') else 'rejected: ' + fg.get('reason', '?')}",
            "",
        ]
    lines += [
        "| engine | form | batch | phase | variant | median | p10-p90 | tok/s | speedup vs dense | note |",
        "|---|---|---:|---|---|---:|---|---:|---|---|",
    ]
    for r in result["rows"]:
        tps = r.get("tokens_per_s") or r.get("prompt_tokens_per_s")
        speed = f"{r['speedup']:.2f}x ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f})" if "speedup" in r else ""
        form = r["form"].split(" (")[0]
        lines.append(
            f"| {r['engine']} | {form} | {r['batch']} | {r['phase']} | {r['variant']} | {r['median_s'] * 1e3:.1f} ms | "
            f"{r['p10_s'] * 1e3:.1f}-{r['p90_s'] * 1e3:.1f} | {f'{tps:.1f}' if tps else ''} | {speed} | "
            f"{'NOISY' if r['noisy'] else ''} |"
        )
    if result.get("licence"):
        lines += ["", result["licence"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path | None:
    """Speedup vs batch, one line per (engine, phase). Returns None when there is nothing to plot."""
    points: dict[str, list[tuple[int, float]]] = {}
    for r in result["rows"]:
        if "speedup" in r:
            points.setdefault(f"{r['engine']} {r['phase']}", []).append((r["batch"], r["speedup"]))
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(points.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("speedup (dense time / sparse time)")
    ax.set_title(
        f"{Path(result['model']).name}: sparse vs dense ({result['machine']['threads']} thread(s))", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
