"""The prune stage's vocabularies, torch-free so the CLI and the recipe read them at no import cost: per-block
sparsity allocations and where decoder blocks live between uses (offload)."""

from __future__ import annotations

ALLOCATIONS = ("uniform", "owl", "atp")  # docs/allocation.md
OFFLOAD_MODES = ("none", "cpu", "disk")  # docs/scaling.md
