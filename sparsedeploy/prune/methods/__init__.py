"""Pruning methods, one small module each. `build_method` maps a CLI/recipe name to an instance."""

from __future__ import annotations

from sparsedeploy.common.errors import UserError
from sparsedeploy.prune.method_options import METHOD_NAMES
from sparsedeploy.prune.methods.base import PruneResult, PruningMethod
from sparsedeploy.prune.methods.dsnot import DSnoT
from sparsedeploy.prune.methods.magnitude import Magnitude
from sparsedeploy.prune.methods.sparsegpt import SparseGPT
from sparsedeploy.prune.methods.wanda import Wanda

# The registry, in the order of the declared names (prune/method_options.py, torch-free, owns the vocabulary)
METHODS = {cls.name: cls for cls in (Magnitude, Wanda, SparseGPT, DSnoT)}


def build_method(name: str, **options) -> PruningMethod:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHOD_NAMES))}")
    return METHODS[name](**options)


__all__ = ["METHODS", "PruneResult", "PruningMethod", "build_method"]
