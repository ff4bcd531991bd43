"""The export vocabulary's static-form options: bench's defaults, in --help, validated, and what the pipeline asks."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.config import BENCH_FORM_OPTIONS, ExportConfig, bench_forms_engine, validate


def test_static_form_defaults_are_the_bench_defaults_and_shown_in_help():
    from sparsedeploy.bench.config import BenchConfig
    from sparsedeploy.cli.main import cli

    bench = BenchConfig(model="x")
    export = ExportConfig(model="x")
    assert export.bench_batch == tuple(bench.batches) and export.bench_prompt_len == bench.prompt_len
    assert export.bench_gen_len == bench.gen_len
    text = " ".join(CliRunner().invoke(cli, ["export", "--help"]).output.split())
    for flag, default, _ in BENCH_FORM_OPTIONS.values():
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        assert flag in text and f"[default: {shown}]" in text


@pytest.mark.parametrize(
    ("fields", "engine"),
    [
        ({"target": "deepsparse"}, "deepsparse"),
        ({"target": "tensorrt"}, "tensorrt"),
        ({}, None),
        ({"target": "deepsparse", "bench_forms": "none"}, None),
        ({"bench_forms": "tensorrt"}, "tensorrt"),
    ],
)
def test_which_engine_forms_an_export_writes(fields, engine):
    assert bench_forms_engine(ExportConfig(model="x", **fields)) == engine


@pytest.mark.parametrize(
    "fields",
    [
        {"bench_batch": (0,)},
        {"bench_batch": ()},
        {"bench_prompt_len": 0},
        {"bench_gen_len": -1},
        {"bench_forms": "ort"},
    ],
)
def test_bad_static_form_options_are_refused(fields):
    with pytest.raises(UserError):
        validate(ExportConfig(model="x", **fields))


def test_bad_bench_batch_flag_exits_2_with_one_line(tmp_path):
    from cli_helpers import run_cli_subprocess as cli

    proc = cli("export", "--model", str(tmp_path), "--output", str(tmp_path / "o"), "--bench-batch", "1,x")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --bench-batch '1,x' is not a comma-separated list of integers such as 1,8"
    ]


def test_the_pipeline_exports_the_forms_its_bench_times():
    from sparsedeploy.pipeline.recipe import Recipe
    from sparsedeploy.pipeline.stages import bench_form_fields

    recipe = Recipe()
    assert bench_form_fields(recipe) == {"bench_forms": "none"}
    recipe.bench.enabled, recipe.bench.engine, recipe.bench.batch = True, "deepsparse", [2, 4]
    assert bench_form_fields(recipe) == {
        "bench_forms": "deepsparse",
        "bench_batch": (2, 4),
        "bench_prompt_len": recipe.bench.prompt_len,
        "bench_gen_len": recipe.bench.gen_len,
    }
    recipe.bench.engine = "ort"
    assert bench_form_fields(recipe) == {"bench_forms": "none"}
