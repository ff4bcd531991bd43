"""The CI quality gate: benchmarks/quality.py --ci reruns dense + Wanda-50% and compares with the committed table."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, WIKITEXT_TEST


@pytest.mark.slow
def test_quality_ci_gate_passes_against_committed_results(tmp_path, wikitext_test):
    committed = json.loads((REPO / "benchmarks" / "results" / "quality.json").read_text())
    out = tmp_path / "quality_ci"
    proc = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--ci", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "SPARSEDEPLOY_WIKITEXT2": str(WIKITEXT_TEST)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    gate = doc["gate"]
    assert gate["passed"] and gate["tolerance"] > 0
    base = {r["row"]: r["ppl"] for r in committed["results"] if "error" not in r}
    assert gate["baseline"] == pytest.approx(base["wanda 0.5"] / base["dense"])
    assert 1.0 < gate["current"] < 10.0  # pruning costs perplexity, and not absurdly much
    assert (out.with_suffix(".md")).read_text().count("| ") > 4


def test_quality_ci_gate_fails_on_a_regression(tmp_path):
    """A committed baseline far better than reality must make the gate fail with a one-line reason."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    doc = {"setting": {"x": 1}, "results": [{"row": "dense", "ppl": 10.0}, {"row": "wanda 0.5", "ppl": 30.0}]}
    baseline = tmp_path / "quality.json"
    baseline.write_text(
        json.dumps({"setting": {"x": 1}, "results": [{"row": "dense", "ppl": 10.0}, {"row": "wanda 0.5", "ppl": 20.0}]})
    )
    quality.ci_gate(doc, baseline)
    assert doc["gate"]["passed"] is False and doc["gate"]["current"] == 3.0
    baseline.write_text(json.dumps({"setting": {"x": 2}, "results": []}))
    with pytest.raises(SystemExit, match="another setting"):
        quality.ci_gate(doc, baseline)


def test_settings_compare_without_the_checkout_location():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    a = {"nsamples": 16, "eval_data": "wikitext2:/work/shared/data/wikitext-2-raw/wiki.test.raw"}
    b = {"nsamples": 16, "eval_data": "wikitext2:/tmp/x/shared/data/wikitext-2-raw/wiki.test.raw"}
    assert quality.comparable(a) == quality.comparable(b)
    assert quality.comparable(a) != quality.comparable({**b, "nsamples": 32})


def test_update_docs_replaces_only_the_generated_tables(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, "quality_bench", quality)  # dataclasses look their module up
    spec.loader.exec_module(quality)
    dsnot, alloc = tmp_path / "dsnot.md", tmp_path / "allocation.md"
    dsnot.write_text("intro\n<!-- quality:methods -->\nold\n<!-- /quality -->\nafter\n")
    alloc.write_text(
        "a\n<!-- quality:allocation -->\nold\n<!-- /quality -->\n"
        "b\n<!-- quality:recovery -->\nold\n<!-- /quality -->\nc\n"
    )
    monkeypatch.setattr(quality, "DOC_SECTIONS", {"methods": dsnot, "allocation": alloc, "recovery": alloc})
    doc = json.loads((REPO / "benchmarks" / "results" / "quality.json").read_text())
    assert set(quality.update_docs(doc)) == {dsnot, alloc}
    text = dsnot.read_text()
    assert (
        text.startswith("intro\n<!-- quality:methods -->\nDense: ")
        and text.endswith("<!-- /quality -->\nafter\n")
        and "old" not in text
    )
    text = alloc.read_text()
    assert "| method | allocation |" in text and "| pruned | before recovery |" in text and "old" not in text
    assert quality.update_docs(doc) == []  # idempotent


def test_another_model_gets_its_own_table_and_no_ci_gate(tmp_path):
    """--model names the table after the model; --ci gates only smollm2-135m against the committed table."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    setting = {**quality.asdict(quality.Setting()), "model": "/somewhere/gemma-3-270m-q4_k_m.gguf"}
    doc = {
        "setting": setting,
        "machine": "test box",
        "results": [
            {
                "row": "dense",
                "method": "dense",
                "label": "dense",
                "sparsity": "-",
                "allocation": "uniform",
                "ppl": 10.0,
                "sparsity_measured": 0.0,
                "peak_rss_mib": 1.0,
            }
        ],
    }
    assert quality.to_markdown(doc).startswith("# Pruning quality on gemma-3-270m-q4_k_m.gguf\n")
    assert "BOS + text" not in quality.to_markdown(doc)  # plain windows: nothing said
    doc["results"][0]["bos_per_window"] = True
    doc["notes"] = "## Why the ratio is what it is\n\nmeasured text"
    text = quality.to_markdown(doc)
    assert "Every calibration and evaluation window is BOS + text" in text
    assert text.endswith("## Why the ratio is what it is\n\nmeasured text\n")
    env = {**__import__("os").environ, "SPARSEDEPLOY_WIKITEXT2": str(WIKITEXT_TEST)}
    proc = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--ci", "--model", str(tmp_path / "m.gguf")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode != 0 and "--ci gates smollm2-135m" in proc.stderr
