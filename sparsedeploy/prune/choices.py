"""The prune stage's vocabularies, torch-free so the CLI and the recipe read them at no import cost: per-block
sparsity allocations and where decoder blocks live between uses (offload)."""

from __future__ import annotations

# Per-block sparsity allocations and what each does (docs/allocation.md's table)
ALLOCATION_NOTES = {
    "uniform": "the target sparsity in every block",
    "owl": "outlier-weighted (OWL): blocks with more Wanda-score outliers are pruned less, within ±`--owl-lambda`",
    "atp": "sparsity growing linearly with depth (ATP), the slope chosen by a small perplexity search on "
    "calibration windows",
}
ALLOCATIONS = tuple(ALLOCATION_NOTES)
OFFLOAD_MODES = ("none", "cpu", "disk")  # docs/scaling.md
