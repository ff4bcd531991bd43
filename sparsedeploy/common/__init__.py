"""Shared foundations: errors, atomic files, the sparsity spec, models, data, evaluation, timing, provenance."""
