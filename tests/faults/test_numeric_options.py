"""Numeric options are checked before any work: --seqlen 0 is not silently the default, a negative one is no
shape error."""

import pytest
from faultkit import error_lines, run_cli


@pytest.mark.parametrize(
    "args,line",
    [
        (["prune", "--seqlen", "0"], "error: --seqlen 0 must be at least 2"),
        (["prune", "--seqlen", "-5"], "error: --seqlen -5 must be at least 2"),
        (["prune", "--nsamples", "0"], "error: --nsamples 0 must be at least 1"),
        (["eval", "--seqlen", "0"], "error: --seqlen 0 must be at least 2"),
        (["eval", "--max-windows", "0"], "error: --max-windows 0 must be at least 1"),
        (["run", "--nsamples", "-1"], "error: --nsamples -1 must be at least 1"),
        (["recover", "--steps", "0"], "error: --steps 0 must be at least 1"),
        (["export", "--deepsparse-seq", "0"], "error: --deepsparse-seq 0 must be at least 1"),
        (["bench", "--prompt-len", "0"], "error: --prompt-len 0 must be at least 1"),
        (
            ["generate", "--onnx", "x", "--prompt", "p", "--max-new-tokens", "0"],
            "error: --max-new-tokens 0 must be at least 1",
        ),
    ],
)
def test_bad_numbers_are_refused_before_the_model_loads(args, line, tmp_path, capsys):
    # the model does not exist: an error about it would mean the number was checked too late
    model = [] if args[0] == "generate" else ["--model", str(tmp_path / "no-model")]
    output = ["--output", str(tmp_path / "o")] if args[0] in ("prune", "recover", "export", "run") else []
    code, out, err = run_cli([*args, *model, *output], capsys)
    assert code == 2 and error_lines(err) == [line] and out == ""
    assert not (tmp_path / "o").exists()
