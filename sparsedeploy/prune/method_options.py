"""The pruning methods' vocabulary, torch-free: the method names and every method option's declaration (its
recipe key and dataclass field, prune flag, type or choices, default, least value, help, the methods that take it).

The prune command's method flags, the recipe's `prune.options` checks and the docs tables are generated from
these declarations; the method classes in `prune/methods/` take their defaults and choices from them, and
tests/prune/test_method_options.py holds every class's dataclass fields to them. A new option: one
`MethodOption` here and the field on the method classes that take it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsedeploy.common.errors import UserError

METHOD_NAMES = ("magnitude", "wanda", "sparsegpt", "dsnot")  # the registry's order (prune/methods/__init__.py)


@dataclass(frozen=True)
class MethodOption:
    """One option of one or more methods. `help` may hold ``{default}``, filled with the shown default."""

    key: str  # the method class's dataclass field and the recipe's prune.options key
    type: type  # bool, int, float or str
    default: object
    methods: tuple[str, ...]  # the methods whose class has this field
    help: str
    flag: str | None = None  # the prune command's flag; None: a recipe-only option
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # least accepted value (numbers)
    # (method, option, value): the option applies to that method only while its other option has that value
    only_when: tuple[tuple[str, str, str], ...] = ()

    @property
    def param(self) -> str | None:
        """The click parameter name of the flag (``--dsnot-mode`` -> ``dsnot_mode``)."""
        return self.flag[2:].replace("-", "_") if self.flag else None

    @property
    def name(self) -> str:
        """How messages name the option: its flag, else its recipe key."""
        return self.flag or self.key

    def shown_default(self) -> str:
        """The default as a flag's help and the recipe write it (1.0 -> 1, False -> false)."""
        if self.type is bool:
            return str(self.default).lower()
        return f"{self.default:g}" if self.type is float else str(self.default)

    def help_text(self) -> str:
        return self.help.format(default=self.shown_default())

    def type_name(self) -> str:
        if self.choices:
            return " | ".join(self.choices)
        return {bool: "true or false", int: "an integer", float: "a number", str: "text"}[self.type]


_DSNOT_INITS = ("wanda", "sparsegpt", "magnitude")
_SPARSEGPT_ONLY_WHEN = (("dsnot", "init", "sparsegpt"),)

METHOD_OPTIONS: tuple[MethodOption, ...] = (
    MethodOption(
        "init", str, "wanda", ("dsnot",), "dsnot: initial method [default: {default}]", "--init", choices=_DSNOT_INITS
    ),
    MethodOption(
        "targets",
        str,
        "all",  # measured on smollm2-135m: all >= attn at 60%, 70% and 2:4 (docs/dsnot.md)
        ("dsnot",),
        "dsnot: linears to refine [default: {default}]",
        "--dsnot-targets",
        choices=("all", "attn", "mlp"),
    ),
    MethodOption(
        "mode",
        str,
        "second-order",  # measured best on smollm2-135m at 60%, 70% and 2:4 (docs/dsnot.md)
        ("dsnot",),
        "dsnot: second-order (swaps chosen by the exact error change) or verified (the paper's mean criterion), "
        "both kept only where they lower the actual error; paper (as published) [default: {default}]",
        "--dsnot-mode",
        choices=("verified", "paper", "second-order"),
    ),
    MethodOption(
        "max_cycles",
        int,
        50,
        ("dsnot",),
        "dsnot: prune-and-grow cycles per layer [default: {default}]",
        "--max-cycles",
        minimum=0,
    ),
    MethodOption(
        "update_threshold",
        float,
        0.1,
        ("dsnot",),
        "dsnot: stop a row once its expected error is this small [default: {default}]",
        "--update-threshold",
        minimum=0,
    ),
    MethodOption(
        "pow_of_var_regrowing",
        float,
        1.0,
        ("dsnot",),
        "dsnot: exponent p of Var[x]^p in the grow score [default: {default}]",
        "--pow-of-var-regrowing",
    ),
    MethodOption(
        "no_sign_flip",
        bool,
        False,
        ("dsnot",),
        "dsnot: reject swaps that flip the sign of a row's expected error",
        "--no-sign-flip",
    ),
    MethodOption(
        "verify_rows",
        bool,
        False,
        ("dsnot",),
        "dsnot: keep the refinement row by row where it lowers that row's actual error [default: per linear]; "
        "matters for --dsnot-mode verified and --init sparsegpt (second-order swaps already lower each row's error)",
        "--verify-rows",
    ),
    MethodOption(
        "verify_block",
        bool,
        True,
        ("dsnot",),
        "dsnot, verified modes: keep a block's refinement only if the block output gets closer to dense",
    ),
    MethodOption(
        "verify_model",
        bool,
        True,
        ("dsnot",),
        "dsnot, verified modes: keep the refined model only if it beats the initial method alone on held-out windows",
    ),
    MethodOption("candidates", int, 4, ("dsnot",), "dsnot, second-order: grow candidates examined per row and cycle"),
    MethodOption(
        "blocksize",
        int,
        128,
        ("sparsegpt", "dsnot"),
        "sparsegpt (or dsnot --init sparsegpt): OBS column block [default: {default}]",
        "--blocksize",
        minimum=1,
        only_when=_SPARSEGPT_ONLY_WHEN,
    ),
    MethodOption(
        "percdamp",
        float,
        0.01,
        ("sparsegpt", "dsnot"),
        "sparsegpt (or dsnot --init sparsegpt): dampening, fraction of mean diag(H) [default: {default}]",
        "--percdamp",
        minimum=0,
        only_when=_SPARSEGPT_ONLY_WHEN,
    ),
)
OPTIONS_BY_KEY = {option.key: option for option in METHOD_OPTIONS}


def option(key: str) -> MethodOption:
    return OPTIONS_BY_KEY[key]


def options_of(method: str) -> tuple[MethodOption, ...]:
    """The options `method` takes, in declaration order."""
    return tuple(o for o in METHOD_OPTIONS if method in o.methods)


def check_minimums(options: dict) -> None:
    """Every given numeric option at least its declared least value, else one UserError naming it."""
    for key, value in options.items():
        least = OPTIONS_BY_KEY[key].minimum if key in OPTIONS_BY_KEY else None
        if least is not None and value is not None and not value >= least:
            bound = "0 or more" if least == 0 else f"at least {least:g}"
            raise UserError(f"{OPTIONS_BY_KEY[key].name} {value} must be {bound}")


def check_recipe_options(method: str, options: dict) -> str | None:
    """What is wrong with a recipe's `prune.options` for `method` (unknown key, wrong type, not a choice), or None."""
    takes = {o.key: o for o in options_of(method)}
    for key, value in options.items():
        if key not in takes:
            return f"{key!r} is not an option of {method}: use {', '.join(takes) or 'none (it takes no options)'}"
        decl = takes[key]
        if decl.choices and value not in decl.choices:
            return f"{key}: {value!r} is not one of {', '.join(decl.choices)}"
        if decl.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, decl.type) and (decl.type is bool or not isinstance(value, bool))
        if not ok:
            return f"{key}: {value!r} is not {decl.type_name()}"
    return None
