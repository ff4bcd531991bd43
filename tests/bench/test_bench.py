"""`sparsedeploy bench`: CLI errors, the ORT generation loop and the linear skeleton on a tiny exported LLaMA."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.forms import build_linear_skeleton, matmul_weights
from sparsedeploy.bench.ort import OrtCausalLM
from sparsedeploy.bench.report import markdown, plot
from sparsedeploy.bench.run import run_bench
from sparsedeploy.common.errors import UserError
from sparsedeploy.onnx.storage import onnx_file

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sparsedeploy", *args], capture_output=True, text=True, env=env)


def test_missing_model_dir_is_one_clear_line(tmp_path):
    proc = cli("bench", "--model", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --model") and "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_dir_without_onnx(tmp_path):
    with pytest.raises(UserError, match="no model.onnx"):
        onnx_file(tmp_path)


def test_bad_batch_list(tmp_path):
    proc = cli("bench", "--model", str(tmp_path), "--batch", "1,x")
    assert proc.returncode == 2 and "--batch" in proc.stderr


def test_deepsparse_not_installed_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "model.onnx").write_bytes(b"")
    proc = cli(
        "bench", "--model", str(tmp_path), "--engine", "deepsparse", "--deepsparse-venv", str(tmp_path / "novenv")
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and ("engines install deepsparse" in proc.stderr or "DeepSparse" in proc.stderr)


def test_torch_cuda_without_cuda_exits_nonzero_with_the_reason(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the clean-exit path is for machines without it")
    (tmp_path / "config.json").write_text("{}")
    proc = cli("bench", "--model", str(tmp_path), "--engine", "torch", "--device", "cuda")
    assert proc.returncode == 2  # a requested measurement that did not happen is not a success
    assert proc.stderr.startswith("error: no measurement: ") and "CUDA is not available" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """The tiny random LLaMA exported with KV cache by optimum (dense) plus a 50%-zeroed copy (sparse)."""
    pytest.importorskip("optimum.exporters.onnx")
    import torch
    from optimum.exporters.onnx import main_export

    from tests.conftest import tiny_llama

    root = tmp_path_factory.mktemp("tiny_onnx")
    out = {}
    for name in ("dense", "sparse"):
        model = tiny_llama()
        if name == "sparse":
            with torch.no_grad():
                for mod in model.model.layers.modules():
                    if isinstance(mod, torch.nn.Linear):
                        w = mod.weight
                        w[w.abs() < w.abs().median()] = 0
        ckpt = root / f"{name}_ckpt"
        model.config.use_cache = True
        model.save_pretrained(ckpt)
        main_export(str(ckpt), output=str(root / name), task="text-generation-with-past", do_validation=False)
        out[name] = root / name
    return out


def test_ort_generate_phases(tiny_onnx):
    lm = OrtCausalLM(onnx_file(tiny_onnx["dense"]), threads=1)
    t = lm.generate(batch=2, prompt_len=8, gen_len=3)
    assert set(t) == {"prefill", "decode", "total"}
    assert t["prefill"] > 0 and t["decode"] > 0 and t["total"] == pytest.approx(t["prefill"] + t["decode"])


def test_ort_bench_report(tiny_onnx, tmp_path):
    cfg = BenchConfig(
        model=str(tiny_onnx["sparse"]),
        baseline=str(tiny_onnx["dense"]),
        engine="ort",
        batches=[1, 2],
        prompt_len=8,
        gen_len=2,
        rounds=2,
    )
    result = run_bench(cfg)
    rows = result["rows"]
    assert {(r["variant"], r["batch"], r["phase"]) for r in rows} == {
        (v, b, p) for v in ("dense", "sparse") for b in (1, 2) for p in ("prefill", "decode", "total")
    }
    sparse = [r for r in rows if r["variant"] == "sparse"]
    assert all("speedup" in r and r["speedup"] > 0 for r in sparse)
    assert all("speedup" not in r for r in rows if r["variant"] == "dense")
    assert result["machine"]["threads"] == 1
    md = markdown(result)
    assert "full model with KV cache" in md and "| ort |" in md and "prompt 8 tokens, 2 generated" in md
    png = plot(result, tmp_path / "b.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_writes_json_md_png(tiny_onnx, tmp_path):
    out = tmp_path / "res"
    proc = cli(
        "-q",
        "bench",
        "--model",
        str(tiny_onnx["sparse"]),
        "--baseline",
        str(tiny_onnx["dense"]),
        "--batch",
        "1",
        "--prompt-len",
        "4",
        "--gen-len",
        "1",
        "--rounds",
        "1",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".sparsedeploy-output", "bench.json", "bench.md", "bench.png"]
    data = json.loads((out / "bench.json").read_text())
    assert data["engine"] == "ort" and data["rows"]


def test_linear_skeleton_keeps_every_matmul_and_its_zeros(tiny_onnx, tmp_path):
    weights = matmul_weights(onnx_file(tiny_onnx["sparse"]))
    assert len(weights) >= 2 * 7  # 2 blocks x 7 linears (plus lm_head when exported as a constant MatMul)
    info = build_linear_skeleton(weights, rows=5, out=tmp_path / "s.onnx")
    model = onnx.load(str(tmp_path / "s.onnx"))
    onnx.checker.check_model(model)
    assert info["matmuls"] == len(weights) == sum(n.op_type == "MatMul" for n in model.graph.node)
    assert 0.3 < info["sparsity"] < 0.6  # the zeroed block linears carried into the skeleton
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ones(i.shape, np.float32) for i in sess.get_inputs()}
    outs = sess.run(None, feeds)
    assert all(o.shape[0] == 5 for o in outs)


@pytest.mark.slow
def test_linear_skeleton_runs_in_deepsparse(tiny_onnx, tmp_path, deepsparse_env):
    """The skeleton form is what DeepSparse 1.8 accepts."""
    from sparsedeploy.runtimes import deepsparse_env as ds

    env = deepsparse_env
    path = tmp_path / "s.onnx"
    build_linear_skeleton(matmul_weights(onnx_file(tiny_onnx["sparse"])), rows=4, out=path)
    info = ds.check_model(env, path, batch=4, threads=1)
    assert info["ok"] and info["fraction_supported"] == 1.0


def _cache_tensors(cache, layers: int) -> list:
    """[key_0, value_0, key_1, ...] of a transformers DynamicCache."""
    return [t for i in range(layers) for t in cache[i][:2]]


def test_decoder_stack_matches_the_model_hidden_states(tiny_checkpoint, tmp_path):
    """The prefill form computes the model's last hidden states, and the keys/values its cache holds, from the
    embeddings (ORT vs PyTorch)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsedeploy.onnx.storage import session_from_path
    from sparsedeploy.runtimes.stack_graphs import export_decoder_stack

    batch, seq = 2, 8
    path = export_decoder_stack(tiny_checkpoint, tmp_path / "stack.onnx", batch, seq)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(seq)[None].expand(batch, seq))
        run = model.model(ids, use_cache=True)
    mask = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None].expand(batch, 1, seq, seq)
    sess = session_from_path(path, threads=1)
    assert [o.name for o in sess.get_outputs()] == ["out", "new_key_0", "new_value_0", "new_key_1", "new_value_1"]
    got = sess.run(
        None, {"hidden": hidden.numpy(), "cos": cos.numpy(), "sin": sin.numpy(), "mask": mask.contiguous().numpy()}
    )
    np.testing.assert_allclose(got[0], run.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    for g, expected in zip(got[1:], _cache_tensors(run.past_key_values, 2), strict=True):
        np.testing.assert_allclose(g, expected.numpy(), atol=1e-5, rtol=1e-4)


def test_decoder_stack_decode_step_matches_the_model_with_its_kv_cache(tiny_checkpoint, tmp_path):
    """The decode-step form: one new token per sequence attending to the cached prompt gives the hidden states
    and new cache rows that the model computes with its own DynamicCache."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsedeploy.onnx.storage import session_from_path
    from sparsedeploy.runtimes.stack_graphs import decoder_stack_names, export_decoder_stack

    batch, prompt = 2, 12
    path = export_decoder_stack(tiny_checkpoint, tmp_path / "step.onnx", batch, 1, past=prompt)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (batch, prompt + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = model.model(ids[:, :prompt], use_cache=True)
        past = [t.clone() for t in _cache_tensors(first.past_key_values, 2)]
        step = model.model(ids[:, prompt:], past_key_values=first.past_key_values, use_cache=True)
        hidden = model.model.embed_tokens(ids[:, prompt:])
        cos, sin = model.model.rotary_emb(hidden, torch.full((batch, 1), prompt))
    inputs, outputs = decoder_stack_names(2, prompt)
    feed = dict(
        zip(inputs, [t.numpy() for t in (hidden, cos, sin, torch.zeros(batch, 1, 1, prompt + 1), *past)], strict=True)
    )
    sess = session_from_path(path, threads=1)
    assert [i.name for i in sess.get_inputs()] == inputs and [o.name for o in sess.get_outputs()] == outputs
    got = sess.run(None, feed)
    np.testing.assert_allclose(got[0], step.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    for g, full in zip(got[1:], _cache_tensors(step.past_key_values, 2), strict=True):
        np.testing.assert_allclose(g, full[:, :, prompt:].numpy(), atol=1e-5, rtol=1e-4)  # the step's own row
    # the cache matters: attending to a different past changes the result
    feed["past_value_0"] = feed["past_value_0"] + 1.0
    assert np.abs(sess.run(None, feed)[0] - got[0]).max() > 1e-3


@pytest.mark.slow
def test_decoder_stack_compiles_in_deepsparse(tiny_checkpoint, tmp_path, deepsparse_env):
    from sparsedeploy.runtimes import deepsparse_env as ds
    from sparsedeploy.runtimes.stack_graphs import export_decoder_stack

    path = export_decoder_stack(tiny_checkpoint, tmp_path / "stack.onnx", 1, 16)
    info = ds.check_model(deepsparse_env, path, batch=1, threads=1)
    assert info["ok"] and info["outputs"] == [[1, 16, 64]] + [[1, 2, 16, 16]] * 4  # hidden, then K/V of 2 layers
    step = export_decoder_stack(tiny_checkpoint, tmp_path / "step.onnx", 2, 1, past=16)
    info = ds.check_model(deepsparse_env, step, batch=2, threads=1)
    assert info["ok"] and info["outputs"] == [[2, 1, 64]] + [[2, 2, 1, 16]] * 4


@pytest.mark.cuda
@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="no CUDA device: 2:4 model path not exercised here"
)
def test_two_four_model_on_cuda_converts_linears_and_keeps_logits(tmp_path):
    import torch

    from sparsedeploy.bench.pytorch import TorchCausalLM
    from sparsedeploy.bench.run import run_bench
    from tests.conftest import tiny_two_four_pair

    tiny_two_four_pair(tmp_path)
    dev = torch.device("cuda")
    sparse = TorchCausalLM(tmp_path / "sparse", dev, torch.float16, semi_structured=True)
    plain = TorchCausalLM(tmp_path / "sparse", dev, torch.float16, semi_structured=False)
    assert sparse.converted == 2 * 7  # every linear of both blocks (q, k, v, o, gate, up, down)
    ids = torch.randint(0, 256, (2, 64), device=dev)
    with torch.inference_mode():
        a, b = sparse.model(input_ids=ids).logits.float(), plain.model(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 2e-2 * b.abs().max()
    result = run_bench(
        BenchConfig(
            model=str(tmp_path / "sparse"),
            baseline=str(tmp_path / "dense"),
            engine="torch",
            device="cuda",
            dtype="float16",
            batches=[1],
            prompt_len=64,
            gen_len=4,
            rounds=2,
        )
    )
    assert result["notes"]["semi_structured_linears"] == {"dense": 0, "sparse": 14}
    assert {r["phase"] for r in result["rows"] if "speedup" in r} == {"prefill", "decode", "total"}


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """A tiny LLaMA, dense and Wanda 2:4, exported by sparsedeploy (export_report.json points at each checkpoint)."""
    from onnx_helpers import pruned_tiny_checkpoint

    from sparsedeploy.export.run import ExportConfig, export_checkpoint

    root = tmp_path_factory.mktemp("tiny_exports")
    out = {}
    for name, sparsity in (("dense", "0"), ("sparse", "2:4")):
        ckpt = pruned_tiny_checkpoint(root / f"{name}_ckpt", sparsity)
        export_checkpoint(ExportConfig(model=str(ckpt), verify=False), root / name)
        out[name] = root / name
    return out


@pytest.mark.slow
def test_deepsparse_bench_times_prefill_and_decode_step_on_the_stack(tiny_exports, deepsparse_env):
    """The whole deepsparse engine path: full-graph verdict, prefill on the decoder stack, a decode step on the stack
    with a KV cache, each in DeepSparse and in ONNX Runtime on the same graph."""
    from sparsedeploy.runtimes.deepsparse_env import LICENCE_NOTE

    result = run_bench(
        BenchConfig(
            model=str(tiny_exports["sparse"]),
            baseline=str(tiny_exports["dense"]),
            engine="deepsparse",
            batches=[2],
            prompt_len=8,
            gen_len=4,
            rounds=1,
            deepsparse_venv=str(deepsparse_env.path),
        )
    )
    assert result["licence"] == LICENCE_NOTE and "stack" not in result["notes"]  # both checkpoints were found
    forms = {
        (r["engine"], r["phase"], r["form"].split(" (")[0], r.get("rows")) for r in result["rows"] if "speedup" in r
    }
    assert forms == {(e, "prefill", "decoder stack", 16) for e in ("deepsparse", "ort")} | {
        (e, "decode-step", "decoder stack + KV cache", 2) for e in ("deepsparse", "ort")
    } | {
        (e, p, "whole model, stack graphs", None) for e in ("deepsparse", "ort") for p in ("prefill", "decode", "total")
    }
    full = result["notes"]["full_graph"]  # the verdict either way, with its evidence
    if full["runs"]:
        assert full["ok"] is True and full["outputs"] and full["compile_and_run_s"] > 0
    else:
        assert full["reason"].startswith("DeepSparse") and "full graph in DeepSparse: rejected: " in markdown(result)
    decode = [r for r in result["rows"] if r["phase"] == "decode"]
    assert len(decode) == 4 and all(r["tokens_per_s"] == pytest.approx(2 * 4 / r["median_s"]) for r in decode)
    assert "prompt 8 tokens, 4 generated" in markdown(result)


@pytest.mark.slow
def test_deepsparse_bench_without_generation_times_the_static_forms_only(tiny_exports, deepsparse_env):
    result = run_bench(
        BenchConfig(
            model=str(tiny_exports["sparse"]),
            baseline=str(tiny_exports["dense"]),
            engine="deepsparse",
            batches=[1],
            prompt_len=8,
            gen_len=0,
            rounds=1,
            deepsparse_venv=str(deepsparse_env.path),
        )
    )
    assert {r["phase"] for r in result["rows"]} == {"prefill", "decode-step"}
    assert "prompt 8 tokens, no generation (static forms)" in markdown(result)


def test_tensorrt_needs_a_gpu_device_and_says_so(tiny_exports, tmp_path):
    proc = cli("bench", "--model", str(tiny_exports["sparse"]), "--engine", "tensorrt")
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "error: --engine tensorrt runs on a GPU, not on --device cpu: add --device cuda"
    )


@pytest.mark.skipif(
    __import__("torch").cuda.is_available() and __import__("importlib").util.find_spec("tensorrt") is not None,
    reason="CUDA and tensorrt present: the not-available path is for machines without them",
)
def test_tensorrt_unavailable_is_reported_and_writes_nothing(tiny_exports, tmp_path):
    proc = cli(
        "bench",
        "--model",
        str(tiny_exports["sparse"]),
        "--engine",
        "tensorrt",
        "--device",
        "cuda",
        "-o",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: no measurement: --engine tensorrt: not run: ")
    assert "CUDA is not available" in proc.stderr or "tensorrt package" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_tensorrt_sparse_layer_report_parses_its_log_lines():
    from sparsedeploy.runtimes.tensorrt_runner import sparse_layer_report

    messages = [
        "Compiler backend is used during engine build.",
        "(Sparsity) Layers eligible for sparse math: /layers.0/mlp/up_proj/MatMul, /layers.0/mlp/down_proj/MatMul",
        "(Sparsity) TRT inference plan picked sparse implementation for layers: /layers.0/mlp/down_proj/MatMul",
    ]
    assert sparse_layer_report(messages) == {
        "eligible": ["/layers.0/mlp/up_proj/MatMul", "/layers.0/mlp/down_proj/MatMul"],
        "picked_sparse": ["/layers.0/mlp/down_proj/MatMul"],
    }
    assert sparse_layer_report(["no sparsity lines"]) == {"eligible": [], "picked_sparse": []}


@pytest.mark.cuda
@pytest.mark.skipif(
    not (__import__("torch").cuda.is_available() and __import__("importlib").util.find_spec("tensorrt") is not None),
    reason="needs a CUDA GPU and the tensorrt package (not installable in this project's workplace)",
)
def test_tensorrt_engines_from_the_2of4_export_run_and_agree_with_ort(tiny_exports):
    result = run_bench(
        BenchConfig(
            model=str(tiny_exports["sparse"]),
            baseline=str(tiny_exports["dense"]),
            engine="tensorrt",
            device="cuda",
            dtype="float32",
            batches=[1],
            prompt_len=16,
            rounds=2,
        )
    )
    assert {(r["phase"], r["form"].split(" (")[0]) for r in result["rows"] if "speedup" in r} == {
        ("prefill", "decoder stack"),
        ("decode-step", "decoder stack + KV cache"),
    }
    builds = result["notes"]["builds"]
    assert len(builds) == 4 and all(b["max_rel_err_vs_ort"] < 1e-2 for b in builds)
    assert all(b["eligible_layers"] == 0 for b in builds if b["variant"] == "dense")


def test_static_forms_free_each_form_once_it_is_timed(tiny_exports, tmp_path):
    from sparsedeploy.bench.forms import static_forms

    variants = {n: onnx_file(p) for n, p in tiny_exports.items()}
    seen = []
    for form in static_forms(BenchConfig(model="x", batches=[1, 2], prompt_len=8), variants, tmp_path, notes := {}):
        assert all(p.is_file() for p in form.paths.values())
        seen.append(form)
    assert [(f.batch, f.phase, f.stack, f.rows) for f in seen] == [
        (1, "prefill", True, 8),
        (1, "decode-step", True, 1),
        (2, "prefill", True, 16),
        (2, "decode-step", True, 2),
    ]
    assert [f.form.split(" (")[0] for f in seen[:2]] == ["decoder stack", "decoder stack + KV cache"]
    assert not any(tmp_path.iterdir())  # every form's files deleted after its turn
    assert "skeleton" not in notes and "stack" not in notes


def test_ort_generation_rows_hold_numpy_blas_to_the_bench_threads(tiny_checkpoint, tmp_path, monkeypatch):
    """The ORT side of the whole-generation rows runs NumPy's lm_head with --threads BLAS threads, like the
    DeepSparse worker (OMP_NUM_THREADS), so the two engines' rows pay the same NumPy cost."""
    from threadpoolctl import threadpool_info

    import sparsedeploy.runtimes.decoder_stack as sg
    from sparsedeploy.bench.deepsparse import time_ort_generation
    from sparsedeploy.runtimes.stack_graphs import write_stack_files

    seen = []

    def record(*_args, **_kwargs):
        seen.append({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
        return {"prefill": 1.0, "decode": 1.0, "total": 2.0}

    monkeypatch.setattr(sg, "generation_phases", record)
    bundles = {"dense": write_stack_files(tiny_checkpoint, tmp_path / "b", 1, 8, 12)}
    res = time_ort_generation(bundles, BenchConfig(model="x", threads=1, prompt_len=8, gen_len=4, rounds=2), 1)
    assert len(res.phases["dense"]["decode"]) == 2 and seen and all(s == {1} for s in seen)


def test_ort_bench_loads_a_sparse_storage_export(tmp_path):
    """`--storage sparse` keeps the weights' values in a side file: bench must open it through the one session
    factory that unpacks it, and the unpacked model must compute what the dense-storage export of it computes."""
    from onnx_helpers import pruned_tiny_checkpoint

    from sparsedeploy.export.run import ExportConfig, export_checkpoint
    from sparsedeploy.onnx.storage import SPARSE_FILE

    ckpt = pruned_tiny_checkpoint(tmp_path / "ckpt", "2:4")
    for storage in ("dense", "sparse"):
        export_checkpoint(ExportConfig(model=str(ckpt), storage=storage, verify=False), tmp_path / storage)
    assert (tmp_path / "sparse" / SPARSE_FILE).is_file()
    proc = cli(
        "bench",
        "--engine",
        "ort",
        "--model",
        str(tmp_path / "sparse"),
        "--baseline",
        str(tmp_path / "dense"),
        "--batch",
        "1",
        "--prompt-len",
        "4",
        "--gen-len",
        "2",
        "--rounds",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert {r["variant"] for r in rows} == {"dense", "sparse"} and all(r["median_s"] > 0 for r in rows)
    lms = {s: OrtCausalLM(onnx_file(tmp_path / s), threads=1) for s in ("dense", "sparse")}
    ids = np.arange(1, 7, dtype=np.int64).reshape(1, 6)
    logits = {s: lm.decoder.run(ids, np.ones_like(ids), None)[0] for s, lm in lms.items()}
    np.testing.assert_array_equal(logits["sparse"], logits["dense"])


def test_bench_finds_the_source_checkpoint_from_the_export_report_after_a_move(tmp_path):
    """No directory-layout guess: the export records its checkpoint (absolute and relative), bench reads that."""
    import os

    from onnx_helpers import pruned_tiny_checkpoint

    from sparsedeploy.bench.forms import source_checkpoint
    from sparsedeploy.export.run import ExportConfig, export_checkpoint

    ckpt = pruned_tiny_checkpoint(tmp_path / "run" / "model", "2:4")
    report = export_checkpoint(ExportConfig(model=str(ckpt), verify=False), tmp_path / "run" / "onnx")
    assert report["model_path_relative"] == os.path.join("..", "model")
    assert source_checkpoint(tmp_path / "run" / "onnx") == ckpt
    os.replace(tmp_path / "run", tmp_path / "moved")
    found = source_checkpoint(tmp_path / "moved" / "onnx")
    assert found is not None and found.resolve() == (tmp_path / "moved" / "model").resolve()
    (tmp_path / "moved" / "model" / "config.json").unlink()  # the checkpoint is gone: nothing is guessed
    assert source_checkpoint(tmp_path / "moved" / "onnx") is None
