"""Pruning methods, one small module each. `build_method` maps a CLI/recipe name to an instance."""

from __future__ import annotations

from sparsedeploy.common.errors import UserError
from sparsedeploy.prune.methods.base import PruneResult, PruningMethod
from sparsedeploy.prune.methods.dsnot import DSnoT
from sparsedeploy.prune.methods.magnitude import Magnitude
from sparsedeploy.prune.methods.sparsegpt import SparseGPT
from sparsedeploy.prune.methods.wanda import Wanda

METHODS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT, "dsnot": DSnoT}


def build_method(name: str, **options) -> PruningMethod:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](**options)


__all__ = ["METHODS", "PruneResult", "PruningMethod", "build_method"]
