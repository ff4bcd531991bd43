import pytest

from sparsedeploy.common.errors import UserError
from sparsedeploy.pipeline.recipe import load_recipe, parse_recipe


def test_defaults_and_example_recipes_parse():
    from conftest import REPO

    recipe = parse_recipe({})
    assert recipe.model == "smollm2-135m" and recipe.prune.method == "wanda"
    for path in (REPO / "examples").glob("*.yaml"):
        load_recipe(path)


@pytest.mark.parametrize("data,key", [
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
    ({"bench": {"enabled": True, "engine": "tensorrt"}, "export": {"enabled": True}, "device": "cpu"}, "bench.engine"),
    ({"bench": {"prompt_len": 0}}, "bench.prompt_len"),
    ({"bench": {"gen_len": -1}}, "bench.gen_len"),
    ({"export": {"dtype": "int8"}}, "export.dtype"),
    ({"export": {"opset": 9}}, "export.opset"),
    ({"device": "tpu"}, "device"),
    ({"device": "cuda:x"}, "device"),
    ({"offload": "ssd"}, "offload"),
])
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
