import pytest

from sparsedeploy.common.errors import UserError
from sparsedeploy.pipeline.recipe import load_recipe, parse_recipe


def test_defaults_and_example_recipes_parse():
    from conftest import REPO

    recipe = parse_recipe({})
    assert recipe.model == "smollm2-135m" and recipe.prune.method == "wanda"
    for path in (REPO / "examples").glob("*.yaml"):
        load_recipe(path)


@pytest.mark.parametrize(
    "data,key",
    [
        ({"prune": {"methd": "wanda"}}, "prune.methd"),
        ({"modle": "x"}, "modle"),
        ({"calibration": {"nsamples": "many"}}, "calibration.nsamples"),
        ({"calibration": {"nsamples": 0}}, "calibration.nsamples"),
        ({"prune": {"sparsity": 1.5}}, "prune.sparsity"),
        ({"prune": {"sparsity": "3:2"}}, "prune.sparsity"),
        ({"prune": {"sparsity": 0.6, "pattern": "2:4"}}, "prune.sparsity"),
        ({"prune": {"sparsity": "2:4", "allocation": "owl"}}, "prune.allocation"),
        ({"prune": {"method": "nope"}}, "prune.method"),
        ({"gate": {"max_ppl_ratio": 0.5}}, "gate.max_ppl_ratio"),
        ({"gate": {"max_ppl_ratio": 2.0}, "eval": {"dense": False}}, "gate.max_ppl_ratio"),
        ({"eval": {"dense": "yes"}}, "eval.dense"),
        ({"export": {"target": "tpu"}}, "export.target"),
        ({"bench": {"enabled": True}}, "bench.enabled"),
        ({"prune": "wanda"}, "prune"),
        ({"prune": {"allocation": "random"}}, "prune.allocation"),
        ({"prune": {"method": "foo+dsnot"}}, "prune.method"),
        ({"prune": {"method": "wanda+dsnot", "options": {"init": "magnitude"}}}, "prune.options.init"),
        ({"prune": {"method": "dsnot", "options": {"max_cycle": 3}}}, "prune.options"),
        ({"bench": {"engine": "tpu"}}, "bench.engine"),
        (
            {"bench": {"enabled": True, "engine": "tensorrt"}, "export": {"enabled": True}, "device": "cpu"},
            "bench.engine",
        ),
        (
            {"bench": {"enabled": True, "engine": "sparse-cpu"}, "export": {"enabled": True, "target": "ort"}},
            "bench.engine",
        ),
        (
            {"bench": {"enabled": True, "engine": "ort"}, "export": {"enabled": True, "target": "sparse-cpu"}},
            "bench.engine",
        ),
        ({"bench": {"prompt_len": 0}}, "bench.prompt_len"),
        ({"bench": {"gen_len": -1}}, "bench.gen_len"),
        ({"export": {"dtype": "int8"}}, "export.dtype"),
        ({"export": {"opset": 9}}, "export.opset"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"offload": "ssd"}, "offload"),
    ],
)
def test_invalid_recipes_name_the_key(data, key):
    with pytest.raises(UserError) as err:
        parse_recipe(data)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_pattern_agreeing_with_ratio_is_accepted():
    recipe = parse_recipe({"prune": {"sparsity": 0.5, "pattern": "2:4"}})
    assert recipe.spec.is_nm and (recipe.spec.n, recipe.spec.m) == (2, 4)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_recipe(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")


def test_method_chain_becomes_dsnot_with_its_initialiser():
    recipe = parse_recipe({"prune": {"method": "sparsegpt+dsnot", "options": {"max_cycles": 5}}})
    assert recipe.prune.method == "dsnot"
    assert recipe.prune.options == {"max_cycles": 5, "init": "sparsegpt"}


def test_cli_choices_and_recipe_checks_come_from_one_vocabulary_each():
    """Each vocabulary has one owner: the CLI's choices are it, the recipe accepts exactly it."""
    import click

    from sparsedeploy.bench.config import ENGINES
    from sparsedeploy.cli.bench import bench
    from sparsedeploy.cli.export import export_cmd
    from sparsedeploy.cli.prune import prune
    from sparsedeploy.export.config import DTYPES, OPSET_RANGE, STORAGES, TARGETS
    from sparsedeploy.prune.choices import ALLOCATIONS, OFFLOAD_MODES

    def choices(command, name):
        option = next(p for p in command.params if p.name == name)
        assert isinstance(option.type, click.Choice)
        return tuple(option.type.choices)

    assert choices(prune, "allocation") == ALLOCATIONS and choices(prune, "offload") == OFFLOAD_MODES
    assert choices(export_cmd, "target") == tuple(TARGETS) and choices(export_cmd, "storage") == STORAGES
    assert choices(export_cmd, "dtype") == tuple(DTYPES) and choices(bench, "engine") == tuple(ENGINES)
    for key, section, values in (
        ("allocation", "prune", ALLOCATIONS),
        ("target", "export", TARGETS),
        ("storage", "export", STORAGES),
        ("dtype", "export", DTYPES),
    ):
        for value in values:
            if key == "allocation" and value != "uniform":
                continue  # owl/atp need calibration choices checked elsewhere; the name itself is accepted below
            if key == "storage" and value == "sparse":
                parse_recipe({"export": {"storage": value, "target": "ort"}})
                continue
            parse_recipe({section: {key: value}})
        with pytest.raises(UserError, match=" or ".join([", ".join(list(values)[:-1]), list(values)[-1]])):
            parse_recipe({section: {key: "nonsense"}})
    for offload in OFFLOAD_MODES:
        parse_recipe({"offload": offload})
    low, high = OPSET_RANGE
    parse_recipe({"export": {"opset": low}})
    with pytest.raises(UserError, match=f"{low}..{high}"):
        parse_recipe({"export": {"opset": high + 1}})


def test_method_chains_come_from_the_methods_declarations():
    from sparsedeploy.prune.methods import METHODS

    refiners = {name: cls for name, cls in METHODS.items() if cls.refines}
    assert set(refiners) == {"dsnot"} and set(refiners["dsnot"].initial_methods) == {"wanda", "sparsegpt", "magnitude"}
    for init in refiners["dsnot"].initial_methods:
        recipe = parse_recipe({"prune": {"method": f"{init}+dsnot"}})
        assert recipe.prune.method == "dsnot" and recipe.prune.options["init"] == init
    with pytest.raises(UserError, match="wanda\\+dsnot"):
        parse_recipe({"prune": {"method": "dsnot+wanda"}})
    assert "max_cycles" in METHODS["dsnot"].option_names() and METHODS["wanda"].option_names() == ()
    assert METHODS["sparsegpt"].needs_hessian and not METHODS["wanda"].needs_hessian
