"""Greedy generation over the decoder-stack graphs (`export --target deepsparse`): in ONNX Runtime and in DeepSparse,
against PyTorch's own tokens, on the tiny model and on the real smollm2-135m."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsedeploy.common.errors import UserError
from sparsedeploy.export.report import summary
from sparsedeploy.export.run import ExportConfig, export_checkpoint
from sparsedeploy.runtimes.decoder_stack import StackHead, greedy


def _head(batch=1, seq=4, context=6, vocab=10, hidden=8, layers=1, kv=1, d=4) -> StackHead:
    rng = np.random.default_rng(0)
    return StackHead(
        embed=rng.standard_normal((vocab, hidden)).astype(np.float32),
        lm_head=rng.standard_normal((vocab, hidden)).astype(np.float32),
        cos=np.ones((context, d), np.float32),
        sin=np.zeros((context, d), np.float32),
        batch=batch,
        seq=seq,
        context=context,
        layers=layers,
        kv_heads=kv,
        head_dim=d,
    )


def _recording_graphs(head: StackHead, calls: list):
    """Graphs that echo their hidden input and record what they were given (shapes, masks)."""

    def prefill(arrays):
        calls.append(("prefill", [a.copy() for a in arrays]))
        b, s = arrays[0].shape[:2]
        return [
            arrays[0],
            *[np.full((b, head.kv_heads, s, head.head_dim), 1.0, np.float32) for _ in range(2 * head.layers)],
        ]

    def step(arrays):
        calls.append(("step", [a.copy() for a in arrays]))
        b = arrays[0].shape[0]
        return [
            arrays[0],
            *[
                np.full((b, head.kv_heads, 1, head.head_dim), 2.0 + len(calls), np.float32)
                for _ in range(2 * head.layers)
            ],
        ]

    return prefill, step


def test_greedy_pads_the_prompt_masks_empty_cache_slots_and_fills_them_in_order():
    head = _head()
    calls: list = []
    prefill, step = _recording_graphs(head, calls)
    tokens = greedy(head, prefill, step, np.array([[1, 2]]), new_tokens=4)
    assert tokens.shape == (1, 4)
    name, (hidden, cos, sin, mask) = calls[0]
    assert name == "prefill" and hidden.shape == (1, 4, 8) and not hidden[0, 2:].any()  # padded on the right
    assert mask.shape == (1, 1, 4, 4) and mask[0, 0, 0, 1] < -1e30 and mask[0, 0, 1, 0] == 0  # causal
    steps = [c[1] for c in calls[1:]]
    assert len(steps) == 3
    for i, arrays in enumerate(steps):  # positions 2, 3, 4: slots >= position are masked, the token itself is not
        pos, m, key0 = 2 + i, arrays[3][0, 0, 0], arrays[4]
        assert (m[:pos] == 0).all() and (m[pos : head.context] < -1e30).all() and m[head.context] == 0
        assert (key0[0, 0, :2] == 1.0).all() and not key0[0, 0, pos:].any()  # prompt rows copied, later slots empty
        if i:
            assert (key0[0, 0, pos - 1] == 2.0 + 1 + i).all()  # the previous step's keys went into its slot


@pytest.mark.parametrize(
    "kwargs, ids, new, words",
    [
        ({"batch": 2}, [[1, 2]], 2, "batch 2"),
        ({}, [[1, 2, 3, 4, 5]], 2, "1..4"),
        ({}, [[1, 2, 3]], 5, "cache of 6 slots"),
    ],
)
def test_greedy_refuses_what_the_static_graphs_cannot_take(kwargs, ids, new, words):
    head = _head(**kwargs)
    prefill, step = _recording_graphs(head, [])
    with pytest.raises(ValueError, match=words):
        greedy(head, prefill, step, np.array(ids), new)


def test_context_smaller_than_the_prompt_graph_is_refused(tmp_path):
    with pytest.raises(UserError, match="--deepsparse-context 64 is smaller than --deepsparse-seq 128"):
        export_checkpoint(ExportConfig(model=str(tmp_path), target="deepsparse", deepsparse_context=64), tmp_path / "o")


@pytest.fixture(scope="module")
def tiny_deepsparse_export(tmp_path_factory):
    from onnx_helpers import pruned_tiny_checkpoint

    root = tmp_path_factory.mktemp("stack_gen")
    ckpt = pruned_tiny_checkpoint(root / "ckpt", "2:4")
    report = export_checkpoint(
        ExportConfig(
            model=str(ckpt),
            target="deepsparse",
            deepsparse_batch=2,
            deepsparse_seq=16,
            deepsparse_context=40,
            greedy_tokens=24,
        ),
        root / "onnx",
    )
    return root / "onnx", report["deepsparse_form"]


def test_export_checks_generation_through_the_graphs_against_pytorch(tiny_deepsparse_export):
    onnx_dir, form = tiny_deepsparse_export
    report = json.loads((onnx_dir / "export_report.json").read_text())
    assert (form["batch"], form["seq"], form["context"]) == (2, 16, 40)
    assert form["generation"]["identical"] and [r["new_tokens"] for r in form["generation"]["prompts"]] == [24, 24]
    data, text = summary(report, onnx_dir)
    assert data["deepsparse_greedy_identical"] and text.endswith(
        "DeepSparse graphs (prefill + decode step): greedy 24 tokens identical to PyTorch"
    )


@pytest.mark.slow
def test_deepsparse_generates_pytorchs_tokens_from_the_graphs(tiny_deepsparse_export, deepsparse_env):
    from sparsedeploy.runtimes import deepsparse_env as ds

    onnx_dir, form = tiny_deepsparse_export
    ref = form["generation"]["prompts"][0]  # PyTorch's tokens (the export checked ORT gives the same)
    tokenizer_ids = _prompt_ids(onnx_dir, ref["prompt"])
    reply = ds.generate(deepsparse_env, onnx_dir, [tokenizer_ids, tokenizer_ids], ref["new_tokens"])
    assert reply["tokens"] == [ref["tokens"], ref["tokens"]]
    assert len(reply["timings"]["prefill"]) == 1 and len(reply["timings"]["step"]) == ref["new_tokens"] - 1


def test_generate_without_the_graphs_says_how_to_get_them(tmp_path):
    from sparsedeploy.runtimes import deepsparse_env as ds

    never_started = ds.DeepSparseEnv(tmp_path / "no-venv")  # the missing graphs are found before any worker runs
    with pytest.raises(UserError, match="export with --target deepsparse"):
        ds.generate(never_started, tmp_path, [[1, 2]], 4)


def _prompt_ids(onnx_dir, text: str) -> list[int]:
    from sparsedeploy.onnx.decoder import load_tokenizer

    return load_tokenizer(onnx_dir)(text)["input_ids"]


@pytest.mark.slow
def test_real_model_generates_the_same_text_in_deepsparse(cache_dir, tmp_path, deepsparse_env):
    """smollm2-135m pruned to 50 % (magnitude): the three files run in DeepSparse give PyTorch's greedy tokens."""
    from sparsedeploy.prune.driver import PruneConfig, run_prune
    from sparsedeploy.runtimes import deepsparse_env as ds

    ckpt = tmp_path / "mag50"
    run_prune(
        PruneConfig(
            model="smollm2-135m", method="magnitude", sparsity="0.5", nsamples=2, seqlen=32, cache_dir=str(cache_dir)
        ),
        ckpt,
        show_progress=False,
    )
    prompt = "The capital of France is"
    report = export_checkpoint(
        ExportConfig(
            model=str(ckpt),
            target="deepsparse",
            deepsparse_seq=32,
            deepsparse_context=64,
            greedy_tokens=20,
            decode_steps=1,
            prompts=(prompt,),
        ),
        tmp_path / "onnx",
    )
    ref = report["deepsparse_form"]["generation"]["prompts"][0]
    assert report["deepsparse_form"]["generation"]["identical"] and ref["new_tokens"] == 20
    reply = ds.generate(deepsparse_env, tmp_path / "onnx", [_prompt_ids(tmp_path / "onnx", prompt)], 20)
    assert reply["tokens"] == [ref["tokens"]], (reply["tokens"], ref["tokens"])
    assert len(ref["text"].split()) >= 5


def _cli(*args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "sparsedeploy", "-q", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_cli_generate_with_deepsparse(tiny_deepsparse_export, deepsparse_env):
    onnx_dir, form = tiny_deepsparse_export
    ref = form["generation"]["prompts"][0]
    proc = _cli(
        "generate",
        "--onnx",
        str(onnx_dir),
        "--prompt",
        ref["prompt"],
        "--max-new-tokens",
        "8",
        "--engine",
        "deepsparse",
        "--deepsparse-venv",
        str(deepsparse_env.path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    eos = _tokenizer(onnx_dir).eos_token_id
    expected = ref["tokens"][:8]
    if eos in expected:
        expected = expected[: expected.index(eos) + 1]
    assert out["tokens"] == expected and out["engine"] == "deepsparse" and "non-production" in out["licence"]
    too_long = _cli(
        "generate",
        "--onnx",
        str(onnx_dir),
        "--prompt",
        ref["prompt"],
        "--max-new-tokens",
        "100",
        "--engine",
        "deepsparse",
        "--deepsparse-venv",
        str(deepsparse_env.path),
    )
    assert too_long.returncode == 2 and "cache of 40 slots: use at most" in too_long.stderr
    assert len(too_long.stderr.strip().splitlines()) == 1


def _tokenizer(onnx_dir):
    from sparsedeploy.onnx.decoder import load_tokenizer

    return load_tokenizer(onnx_dir)


def test_export_refuses_graphs_whose_generation_differs_from_pytorch(tmp_path, monkeypatch):
    """A broken graph/glue (simulated: one token changed) fails the export, nothing written, the divergence named."""
    from onnx_helpers import pruned_tiny_checkpoint

    import sparsedeploy.runtimes.decoder_stack as sg

    real = sg.greedy

    def off_by_one(*args, **kwargs):
        tokens = real(*args, **kwargs)
        tokens[:, 3] = (tokens[:, 3] + 1) % 100
        return tokens

    monkeypatch.setattr(sg, "greedy", off_by_one)
    ckpt = pruned_tiny_checkpoint(tmp_path / "ckpt", "0.5")
    with pytest.raises(UserError, match="differs from PyTorch for .* from token 3 on: nothing written"):
        export_checkpoint(
            ExportConfig(
                model=str(ckpt), target="deepsparse", deepsparse_seq=16, deepsparse_context=32, greedy_tokens=8
            ),
            tmp_path / "onnx",
        )
    assert not (tmp_path / "onnx").exists()
