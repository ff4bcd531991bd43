"""A recipe's `output:` run with --overwrite (the README's quickstart) follows the marker rule too."""

from faultkit import error_lines, listing, run_cli


def test_recipe_output_not_written_by_sparsedeploy_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's output is relative to the current directory
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("\\documentclass{article}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: smollm2-135m\nprune:\n  method: wanda\n  sparsity: 0.5\noutput: work\n")
    code, _, err = run_cli(["run", str(recipe), "--overwrite"], capsys)
    assert code == 2 and len(error_lines(err)) == 1
    assert error_lines(err)[0].startswith("error: refusing to replace work")
    assert listing(tmp_path / "work") == ["thesis.tex"] and not list(tmp_path.glob(".work.*"))
