"""What every pruning method is: statistics it needs, and (weight, stats, spec) -> (mask, weight)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sparsedeploy.common.sparsity import SparsitySpec
from sparsedeploy.prune.calibration import InputStats
from sparsedeploy.prune.method_options import check_minimums


@dataclass
class PruneResult:
    """mask: bool, True = kept. weight: the new weight (zeros where pruned), float32."""

    mask: torch.Tensor
    weight: torch.Tensor
    info: dict | None = None  # per-linear extras a method wants in the report (e.g. DSnoT swaps)


class PruningMethod:
    """Base of every method. A method is a dataclass whose init fields are its options (the recipe's
    `prune.options` keys and the CLI's method flags); its capabilities are declared here, as class
    attributes a method overrides, so the driver reads them instead of probing for hooks."""

    name: str
    needs_hessian: bool = False  # needs XᵀX of each linear's inputs from the calibration walk
    supports_nm: bool = True  # can prune to an N:M pattern along the input dimension
    refines: bool = False  # refines an initial method's result (initial_method(); the recipe's `init+name` chain)
    initial_methods: tuple[str, ...] = ()  # the methods it can refine
    uses_name: bool = False  # prune() takes the linear's name (name=...)
    verify_block: bool = False  # keep a block's refinement only if the block output gets closer to dense
    verify_model: bool = False  # keep the refined model only if it beats the initial method alone
    summary: dict | None = None  # per-run counters for the prune report

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options a recipe or CLI may set: the dataclass init fields, less the name."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("name", "needs_hessian"))

    def check_option_values(self) -> None:
        """Every numeric option at least its declared least value (prune/method_options.py), else a UserError."""
        check_minimums({name: getattr(self, name) for name in self.option_names()})

    def initial_method(self) -> PruningMethod | None:
        """The method whose result this one refines (None: it prunes from the dense weights)."""
        return None

    def block_verdict(self, index: int, kept: bool, error_initial: float, error_refined: float) -> None:
        """Told the block-level check's outcome (verify_block methods)."""

    def model_verdict(self, choice: str, calib_ppl: dict[str, float]) -> None:
        """Told the whole-model check's outcome (verify_model methods)."""

    def prune(self, weight: torch.Tensor, stats: InputStats, spec: SparsitySpec) -> PruneResult:
        """weight: float32 [out, in] on the compute device. Must not modify `weight` in place."""
        raise NotImplementedError
