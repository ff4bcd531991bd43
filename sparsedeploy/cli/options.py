"""Options and printing shared by the command modules: the model options, method flags, JSON-or-text output."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import click

from sparsedeploy.common.errors import UserError
from sparsedeploy.prune.method_options import METHOD_OPTIONS, OPTIONS_BY_KEY, MethodOption, check_minimums

log = logging.getLogger("sparsedeploy")


def emit(data: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, default=str) if as_json else text)


TORCH_DTYPES = ("float32", "float16", "bfloat16")


def choice_option(flag: str, choices: Iterable[str], default: str, help: str | None = None):
    """`flag` limited to `choices` (a vocabulary's names, in its order), its default shown in --help."""
    return click.option(flag, default=default, show_default=True, type=click.Choice(list(choices)), help=help)


def number_option(flag: str, default: int | float, help: str | None = None):
    """A numeric `flag` of the default's type (int or float), its default shown in --help."""
    return click.option(flag, default=default, show_default=True, type=type(default), help=help)


def output_option(help: str, required: bool = False):
    """`--output`/`-o`, the directory a command writes."""
    return click.option("--output", "-o", required=required, type=click.Path(path_type=Path), help=help)


def text_source_option(flag: str, what: str):
    """A text source (`--calib`, `--data`): gensim-wiki unless given; common/data.py reads every form."""
    return click.option(
        flag,
        default="gensim-wiki",
        show_default=True,
        help=f"{what}: gensim-wiki, wikitext2[:PATH], c4, text:PATH, jsonl:PATH",
    )


common_model = [
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N"),
    choice_option("--dtype", TORCH_DTYPES, "float32"),
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


def _method_flag(option: MethodOption):
    """A prune flag generated from a method option's declaration; None (not given) unless set."""
    kwargs: dict = {"default": None, "help": option.help_text()}
    if option.type is bool:
        kwargs["is_flag"] = True
    else:
        kwargs["type"] = click.Choice(list(option.choices)) if option.choices else option.type
    return click.option(option.flag, **kwargs)


# The method flags, one per declared option that has a flag (prune/method_options.py owns them all).
method_option_flags = [_method_flag(o) for o in METHOD_OPTIONS if o.flag]
_FLAG_OPTIONS = {o.param: o for o in METHOD_OPTIONS if o.flag}


def method_options_from_flags(method: str, flags: dict) -> dict:
    """Keyword options for the method from the given flags; a flag the method does not use is an error."""
    options = {}
    for param, value in flags.items():
        if value is None or value is False:
            continue
        option = _FLAG_OPTIONS[param]
        conditions = [(o, v) for m, o, v in option.only_when if m == method]
        if method not in option.methods or any(flags.get(OPTIONS_BY_KEY[o].param) != v for o, v in conditions):
            needs = " or ".join(
                f"--method {m}" + "".join(f" {OPTIONS_BY_KEY[o].flag} {v}" for m2, o, v in option.only_when if m2 == m)
                for m in option.methods
            )
            unless = "".join(f" without {OPTIONS_BY_KEY[o].flag} {v}" for o, v in conditions)
            raise UserError(f"{option.flag} does not apply to --method {method}{unless}: drop it or use {needs}")
        options[option.key] = value
    check_minimums(options)
    return options


def check_numbers(**limits: tuple[float | None, float]) -> None:
    """Numeric options checked before any work: name=(value, least allowed); None means "not given"."""
    for name, (value, least) in limits.items():
        if value is not None and not value >= least:
            raise UserError(f"--{name.replace('_', '-')} {value} must be at least {least:g}")


def parse_batch_list(text: str, flag: str = "--batch") -> list[int]:
    """`--batch 1,8` (bench and run; export's --bench-batch): comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of integers such as 1,8") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text!r} must list positive integers such as 1,8")
    return values
