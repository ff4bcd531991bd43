"""The method options have one owner (prune/method_options.py): the method classes, the prune flags and the
recipe's checks all agree with its declarations."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import click
import pytest

from sparsedeploy.common.errors import UserError
from sparsedeploy.prune.method_options import (
    METHOD_NAMES,
    METHOD_OPTIONS,
    check_recipe_options,
    option,
    options_of,
)
from sparsedeploy.prune.methods import METHODS
from sparsedeploy.prune.methods.base import PruningMethod


def declaration_mismatches(name: str, cls: type) -> list[str]:
    """How the dataclass options of `cls` (method `name`) differ from the declarations: [] when they agree."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name in cls.option_names()}
    declared = {o.key: o for o in options_of(name)}
    problems = [f"{name}.{key}: a field with no declaration" for key in fields.keys() - declared.keys()]
    problems += [f"{name}.{key}: declared but not a field" for key in declared.keys() - fields.keys()]
    for key in fields.keys() & declared.keys():
        field, decl = fields[key], declared[key]
        if field.type != decl.type.__name__:
            problems.append(f"{name}.{key}: field type {field.type}, declared {decl.type.__name__}")
        if field.default != decl.default or type(field.default) is not decl.type:
            problems.append(f"{name}.{key}: field default {field.default!r}, declared {decl.default!r}")
    return problems


def test_method_names_are_the_registry():
    assert tuple(METHODS) == METHOD_NAMES
    assert all(cls.name == name for name, cls in METHODS.items())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_class_agrees_with_the_declarations(name):
    assert declaration_mismatches(name, METHODS[name]) == []


def test_a_class_that_differs_from_the_declarations_is_caught():
    @dataclass
    class Drifted(PruningMethod):
        blocksize: int = 64  # declared default 128
        percdamp: str = "0.01"  # declared float
        damping: float = 0.1  # declared nowhere
        name: str = "sparsegpt"

    problems = declaration_mismatches("sparsegpt", Drifted)
    assert any("blocksize: field default 64" in p for p in problems)
    assert any("percdamp: field type str" in p for p in problems)
    assert any("damping: a field with no declaration" in p for p in problems)

    @dataclass
    class Missing(PruningMethod):
        blocksize: int = 128
        name: str = "sparsegpt"

    assert declaration_mismatches("sparsegpt", Missing) == ["sparsegpt.percdamp: declared but not a field"]


@pytest.mark.parametrize("decl", [o for o in METHOD_OPTIONS if o.choices], ids=lambda o: o.key)
def test_declared_choices_are_what_the_classes_accept(decl):
    for name in decl.methods:
        for choice in decl.choices:
            assert getattr(METHODS[name](**{decl.key: choice}), decl.key) == choice
        with pytest.raises(UserError, match="not-a-choice"):
            METHODS[name](**{decl.key: "not-a-choice"})


@pytest.mark.parametrize("decl", [o for o in METHOD_OPTIONS if o.minimum is not None], ids=lambda o: o.key)
def test_declared_minimums_are_what_the_classes_enforce(decl):
    below = decl.type(decl.minimum - 1)
    for name in decl.methods:
        METHODS[name](**{decl.key: decl.type(decl.minimum)})
        with pytest.raises(UserError, match=f"^{decl.name} {below} must be "):
            METHODS[name](**{decl.key: below})


def test_refiners_refine_the_declared_initial_methods():
    assert METHODS["dsnot"].initial_methods == option("init").choices
    assert set(option("init").choices) <= set(METHOD_NAMES)


def test_prune_flags_are_generated_from_the_declarations():
    from sparsedeploy.cli.prune import prune

    params = {p.name: p for p in prune.params}
    assert params["method"].help == ", ".join(METHOD_NAMES)
    flagged = [o for o in METHOD_OPTIONS if o.flag]
    assert {"init", "dsnot_mode", "blocksize"} <= {o.param for o in flagged}
    for decl in flagged:
        param = params[decl.param]
        assert param.opts == [decl.flag] and param.default is None and param.help == decl.help_text()
        if decl.type is bool:
            assert param.is_flag
        elif decl.choices:
            assert isinstance(param.type, click.Choice) and tuple(param.type.choices) == decl.choices
        else:
            assert param.type.name == {int: "integer", float: "float"}[decl.type]
    assert params["max_cycles"].help.endswith("[default: 50]") and params["pow_of_var_regrowing"].help.endswith(
        "[default: 1]"
    )
    recipe_only = {o.key for o in METHOD_OPTIONS if not o.flag}
    assert recipe_only == {"verify_block", "verify_model", "candidates"} and not recipe_only & params.keys()


@pytest.mark.parametrize(
    "method, options, problem",
    [
        ("dsnot", {"max_cycle": 3}, "'max_cycle' is not an option of dsnot: use init, targets, mode, max_cycles"),
        ("wanda", {"blocksize": 3}, "'blocksize' is not an option of wanda: use none"),
        ("dsnot", {"max_cycles": "5"}, "max_cycles: '5' is not an integer"),
        ("dsnot", {"max_cycles": True}, "max_cycles: True is not an integer"),
        ("sparsegpt", {"percdamp": "a lot"}, "percdamp: 'a lot' is not a number"),
        ("dsnot", {"verify_rows": 1}, "verify_rows: 1 is not true or false"),
        ("dsnot", {"mode": "fast"}, "mode: 'fast' is not one of verified, paper, second-order"),
    ],
)
def test_recipe_options_are_checked_against_the_declarations(method, options, problem):
    result = check_recipe_options(method, options)
    assert result is not None and result.startswith(problem), result


def test_good_recipe_options_pass_and_reach_the_recipe():
    from sparsedeploy.pipeline.recipe import parse_recipe

    assert check_recipe_options("sparsegpt", {"percdamp": 0, "blocksize": 64}) is None
    assert check_recipe_options("dsnot", {"init": "sparsegpt", "verify_model": False, "candidates": 2}) is None
    with pytest.raises(UserError, match="recipe key prune.options: not accepted by dsnot: max_cycles: '5' is not"):
        parse_recipe({"prune": {"method": "dsnot", "options": {"max_cycles": "5"}}})
    with pytest.raises(UserError, match="recipe key prune.options: --blocksize 0 must be at least 1"):
        parse_recipe({"prune": {"method": "sparsegpt", "options": {"blocksize": 0}}})
