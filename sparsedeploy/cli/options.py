"""Options and printing shared by the command modules: the model options, method flags, JSON-or-text output."""

from __future__ import annotations

import json
import logging

import click

from sparsedeploy.common.errors import UserError

log = logging.getLogger("sparsedeploy")


def emit(data: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, default=str) if as_json else text)


common_model = [
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N"),
    click.option(
        "--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"])
    ),
    click.option(
        "--cache-dir",
        default=None,
        help="where converted checkpoints are cached [default: $SPARSEDEPLOY_CACHE or ~/.cache/sparsedeploy]",
    ),
]


def with_options(options):
    def wrap(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return wrap


# Method-specific prune flags -> the option (dataclass field) of the method class they set. Which methods take
# an option is the methods' own declaration (PruningMethod.option_names()), read when the command runs.
_METHOD_FLAGS = {
    "init": "init",
    "dsnot_targets": "targets",
    "dsnot_mode": "mode",
    "max_cycles": "max_cycles",
    "update_threshold": "update_threshold",
    "pow_of_var_regrowing": "pow_of_var_regrowing",
    "no_sign_flip": "no_sign_flip",
    "verify_rows": "verify_rows",
    "blocksize": "blocksize",
    "percdamp": "percdamp",
}
method_option_flags = [
    click.option(
        "--init",
        default=None,
        type=click.Choice(["wanda", "sparsegpt", "magnitude"]),
        help="dsnot: initial method [default: wanda]",
    ),
    click.option(
        "--dsnot-targets",
        default=None,
        type=click.Choice(["all", "attn", "mlp"]),
        help="dsnot: linears to refine [default: all]",
    ),
    click.option(
        "--dsnot-mode",
        default=None,
        type=click.Choice(["verified", "paper", "second-order"]),
        help=(
            "dsnot: second-order (swaps chosen by the exact error change) or verified (the paper's mean criterion), "
            "both kept only where they lower the actual error; paper (as published) [default: second-order]"
        ),
    ),
    click.option("--max-cycles", default=None, type=int, help="dsnot: prune-and-grow cycles per layer [default: 50]"),
    click.option(
        "--update-threshold",
        default=None,
        type=float,
        help="dsnot: stop a row once its expected error is this small [default: 0.1]",
    ),
    click.option(
        "--pow-of-var-regrowing",
        default=None,
        type=float,
        help="dsnot: exponent p of Var[x]^p in the grow score [default: 1]",
    ),
    click.option(
        "--no-sign-flip",
        is_flag=True,
        default=None,
        help="dsnot: reject swaps that flip the sign of a row's expected error",
    ),
    click.option(
        "--verify-rows",
        is_flag=True,
        default=None,
        help="dsnot: keep the refinement row by row where it lowers that row's actual error [default: per linear]; "
        "matters for --dsnot-mode verified and --init sparsegpt (second-order swaps already lower each row's error)",
    ),
    click.option(
        "--blocksize",
        default=None,
        type=int,
        help="sparsegpt (or dsnot --init sparsegpt): OBS column block [default: 128]",
    ),
    click.option(
        "--percdamp",
        default=None,
        type=float,
        help="sparsegpt (or dsnot --init sparsegpt): dampening, fraction of mean diag(H) [default: 0.01]",
    ),
]


def method_options_from_flags(method: str, flags: dict) -> dict:
    """Keyword options for the method from the given flags; a flag the method does not use is an error."""
    from sparsedeploy.prune.methods import METHODS

    options = {}
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        keyword = _METHOD_FLAGS[flag]
        cli_name = "--" + flag.replace("_", "-")
        takes = [name for name, cls in METHODS.items() if keyword in cls.option_names()]
        if method not in takes or (
            flag in ("blocksize", "percdamp") and method == "dsnot" and flags.get("init") != "sparsegpt"
        ):
            needs = (
                "--method sparsegpt or --method dsnot --init sparsegpt"
                if flag in ("blocksize", "percdamp")
                else " or ".join(f"--method {name}" for name in takes)
            )
            raise UserError(
                f"{cli_name} does not apply to --method "
                f"{method}{' without --init sparsegpt' if method == 'dsnot' else ''}: drop it or use {needs}"
            )
        options[keyword] = value
    if "blocksize" in options and options["blocksize"] < 1:
        raise UserError(f"--blocksize {options['blocksize']} must be at least 1")
    if "percdamp" in options and not options["percdamp"] >= 0:
        raise UserError(f"--percdamp {options['percdamp']} must be 0 or more")
    return options


def check_numbers(**limits: tuple[float | None, float]) -> None:
    """Numeric options checked before any work: name=(value, least allowed); None means "not given"."""
    for name, (value, least) in limits.items():
        if value is not None and not value >= least:
            raise UserError(f"--{name.replace('_', '-')} {value} must be at least {least:g}")


def parse_batch_list(text: str) -> list[int]:
    """`--batch 1,8` (bench and run): comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--batch {text!r} is not a comma-separated list of integers such as 1,8") from None
    if not values or min(values) < 1:
        raise UserError(f"--batch {text!r} must list positive integers such as 1,8")
    return values
