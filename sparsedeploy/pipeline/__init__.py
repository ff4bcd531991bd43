"""The end-to-end run: the recipe, its stages (prune, evaluate, gate, export, bench) and REPORT.md."""
