import json

import pytest

from sparsedeploy.cli import main
from sparsedeploy.common.errors import UserError
from sparsedeploy.pipeline.recipe import parse_recipe
from sparsedeploy.pipeline.stages import Pipeline


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(f"w{i % 150} The quick brown fox." for i in range(600)))
    return path


def _recipe_dict(ckpt, text, **gate) -> dict:
    return {
        "model": str(ckpt),
        "device": "cpu",
        "calibration": {"source": f"text:{text}", "nsamples": 2, "seqlen": 32},
        "prune": {"method": "wanda", "sparsity": "2:4"},
        "eval": {"data": f"text:{text}", "seqlen": 32, "max_windows": 4},
        "gate": gate,
    }


def tiny_recipe(ckpt, text, **gate):
    return parse_recipe(_recipe_dict(ckpt, text, **gate))


def test_pipeline_writes_one_output_dir_with_report(tiny_checkpoint, text_file, tmp_path):
    out = tmp_path / "run"
    report = Pipeline(tiny_recipe(tiny_checkpoint, text_file, max_ppl_ratio=1000.0), out, show_progress=False).run()
    assert report["gate"]["passed"]
    for name in (
        "REPORT.md",
        "report.json",
        "model/model.safetensors",
        "model/masks.safetensors",
        "plots/sparsity_per_block.png",
    ):
        assert (out / name).is_file(), name
    text = (out / "REPORT.md").read_text()
    assert "Quality gate: PASSED" in text and "| dense |" in text and "| pruned |" in text
    saved = json.loads((out / "report.json").read_text())
    assert saved["pruned"]["sparsity"] > 0.49 and len(saved["blocks"]) == 2
    assert not list(tmp_path.glob(".run*"))


def test_gate_failure_exits_3_and_still_reports(tiny_checkpoint, text_file, tmp_path, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_checkpoint),
                "device": "cpu",
                "calibration": {"source": f"text:{text_file}", "nsamples": 2, "seqlen": 32},
                "prune": {"sparsity": 0.9},
                "eval": {"data": f"text:{text_file}", "seqlen": 32, "max_windows": 4},
                "gate": {"max_ppl": 1.0001},
            }
        )
    )
    with pytest.raises(SystemExit) as exc:
        main(["-q", "run", str(recipe), "--output", str(tmp_path / "out")])
    assert exc.value.code == 3
    assert "quality gate FAILED" in capsys.readouterr().err
    assert "Quality gate: FAILED" in (tmp_path / "out" / "REPORT.md").read_text()


def test_pipeline_resume_skips_finished_stages(tiny_checkpoint, text_file, tmp_path, monkeypatch):
    import sparsedeploy.pipeline.stages as pipeline_mod

    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_checkpoint, text_file)
    real = pipeline_mod._evaluate
    calls = []

    def flaky(model_ref, *args):
        calls.append(model_ref)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted while evaluating the pruned model
        return real(model_ref, *args)

    monkeypatch.setattr(pipeline_mod, "_evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(recipe, out, show_progress=False).run()
    assert not out.exists() and (tmp_path / ".run.staging" / "model" / "report.json").is_file()
    from sparsedeploy.common.errors import UserError

    with pytest.raises(UserError, match="--resume"):
        Pipeline(recipe, out, show_progress=False).run()
    report = Pipeline(recipe, out, resume=True, show_progress=False).run()
    assert len(calls) == 3  # dense evaluation was not repeated, only the pruned one
    assert report["pruned"]["sparsity"] > 0.49 and (out / "REPORT.md").is_file()


def test_cli_flags_override_recipe_and_name_missing_output(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--sparsity", "0.5"])
    assert exc.value.code == 2 and "--output" in capsys.readouterr().err


def test_pipeline_exports_a_verified_onnx_model(tiny_checkpoint, text_file, tmp_path):
    recipe = parse_recipe({**_recipe_dict(tiny_checkpoint, text_file), "export": {"enabled": True}})
    out = tmp_path / "run"
    report = Pipeline(recipe, out, show_progress=False).run()
    exported = report["stage_results"]["export"]
    assert exported["verified"] and exported["zeros_onnx"] == exported["zeros_torch"] > 0
    assert exported["nm_qualifying"] == exported["linears"] == 14  # 2 blocks x 7 linears, all 2:4 along K
    assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / "export_report.json").is_file()
    text = (out / "REPORT.md").read_text()
    assert "## Export" in text and "satisfy 2:4" in text


def test_pipeline_runs_a_dsnot_chain_with_owl(tiny_checkpoint, text_file, tmp_path):
    data = _recipe_dict(tiny_checkpoint, text_file)
    data["prune"] = {"method": "wanda+dsnot", "sparsity": "0.5", "allocation": "owl", "options": {"max_cycles": 5}}
    report = Pipeline(parse_recipe(data), tmp_path / "run", show_progress=False).run()
    prune = json.loads((tmp_path / "run" / "model" / "report.json").read_text())
    assert prune["method"] == "dsnot" and prune["method_options"]["init"] == "wanda"
    assert prune["allocation"]["kind"] == "owl"
    assert abs(report["pruned"]["sparsity"] - 0.5) < 0.01


def test_pipeline_benches_the_export_against_the_dense_model(tiny_checkpoint, text_file, tmp_path):
    recipe = parse_recipe(
        {
            **_recipe_dict(tiny_checkpoint, text_file),
            "export": {"enabled": True, "verify": False},
            "bench": {"enabled": True, "engine": "ort", "batch": [1], "prompt_len": 8, "gen_len": 2},
        }
    )
    out = tmp_path / "run"
    report = Pipeline(recipe, out, show_progress=False).run()
    bench = report["stage_results"]["bench"]
    assert bench["engine"] == "ort" and set(bench["speedups"]) == {"batch 1 prefill", "batch 1 decode", "batch 1 total"}
    assert all(v > 0 for v in bench["speedups"].values())
    assert (out / "bench" / "bench.json").is_file() and not (out / "bench" / ".dense_onnx").exists()
    saved = json.loads((out / "bench" / "bench.json").read_text())
    assert {r["variant"] for r in saved["rows"]} == {"dense", "sparse"}
    text = (out / "REPORT.md").read_text()
    assert "## Bench" in text and "speedup vs dense" in text


@pytest.mark.skipif(
    __import__("torch").cuda.is_available() and __import__("importlib").util.find_spec("tensorrt") is not None,
    reason="CUDA and tensorrt present: this checks the report where TensorRT cannot run",
)
def test_pipeline_refuses_a_bench_that_cannot_run_before_any_work(tiny_checkpoint, text_file, tmp_path):
    recipe = parse_recipe(
        {
            **_recipe_dict(tiny_checkpoint, text_file),
            "device": "auto",
            "export": {"enabled": True, "verify": False},
            "bench": {"enabled": True, "engine": "tensorrt", "batch": [1], "prompt_len": 8},
        }
    )
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"bench.engine tensorrt cannot run here \(.+\): set bench.enabled: false"):
        Pipeline(recipe, out, show_progress=False).run()
    assert not out.exists() and not list(tmp_path.glob(".run*"))  # nothing pruned, nothing written


def test_cli_stage_flags_reach_the_recipe(tiny_checkpoint, text_file, tmp_path, monkeypatch):
    """`run` flags override every stage's key; the merged recipe is validated and recorded in report.json."""
    import yaml

    import sparsedeploy.pipeline.stages as pipeline_mod

    seen = {}

    class Recorder(pipeline_mod.Pipeline):
        def run(self):
            seen["recipe"] = self.recipe
            return {"dense": None, "pruned": {"ppl": 1.0, "sparsity": 0.6}, "gate": {"passed": True}}

    monkeypatch.setattr(pipeline_mod, "Pipeline", Recorder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe_dict(tiny_checkpoint, text_file)))
    main(
        [
            "-q",
            "run",
            str(recipe),
            "-o",
            str(tmp_path / "o"),
            "--sparsity",
            "0.6",
            "--allocation",
            "owl",
            "--offload",
            "cpu",
            "--export",
            "--export-target",
            "tensorrt",
            "--export-dtype",
            "float16",
            "--storage",
            "dense",
            "--bench",
            "--bench-engine",
            "ort",
            "--batch",
            "1,8",
        ]
    )
    r = seen["recipe"]
    assert (r.prune.allocation, r.offload, r.export.target, r.export.dtype, r.bench.engine, r.bench.batch) == (
        "owl",
        "cpu",
        "tensorrt",
        "float16",
        "ort",
        [1, 8],
    )


@pytest.mark.parametrize(
    "flags,needle",
    [(["--batch", "1,x"], "--batch"), (["--offload", "ssd"], "offload"), (["--bench-engine", "tpu"], "bench.engine")],
)
def test_cli_bad_stage_flags_are_one_line(tiny_checkpoint, text_file, tmp_path, capsys, flags, needle):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe_dict(tiny_checkpoint, text_file)))
    with pytest.raises(SystemExit) as exc:
        main(["-q", "run", str(recipe), "-o", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_pipeline_prunes_with_offload(tiny_checkpoint, text_file, tmp_path):
    data = _recipe_dict(tiny_checkpoint, text_file, max_ppl_ratio=1000.0)
    data["offload"] = "disk"
    report = Pipeline(parse_recipe(data), tmp_path / "run", show_progress=False).run()
    assert report["gate"]["passed"]
    assert json.loads((tmp_path / "run" / "model" / "report.json").read_text())["offload"] == "disk"
