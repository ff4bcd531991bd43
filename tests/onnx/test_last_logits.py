"""Logits of the last position only (onnx/last_logits.py): the full graph's last row, on every way a graph runs
(plain ONNX Runtime, external data, a sparse-cpu export with a MatMul or a kernel-run lm_head); a graph whose
logits are not a plain lm_head is refused and generation falls back to every position's logits."""

from __future__ import annotations

import glob
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_helpers import pruned_tiny_checkpoint
from test_int8_nodes import tied_graph

from sparsedeploy.bench.config import BenchConfig
from sparsedeploy.bench.ort import load_models
from sparsedeploy.common.errors import UserError
from sparsedeploy.export.run import ExportConfig, export_checkpoint
from sparsedeploy.kernels import native
from sparsedeploy.onnx.decoder import OnnxDecoder
from sparsedeploy.onnx.int8_nodes import pack_scaled_int8
from sparsedeploy.onnx.last_logits import LastLogitsUnavailable, keep_last_position_logits
from sparsedeploy.onnx.segmented import SegmentedSession
from sparsedeploy.onnx.storage import session_from_path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny pruned LLaMA exported for ONNX Runtime, for sparse-cpu, with its weights in an external-data file (and
    its Constant nodes' tensors too), and with a soft-capped lm_head (tanh after it): {form: export directory}."""
    root = tmp_path_factory.mktemp("last")
    ckpt = pruned_tiny_checkpoint(root / "ckpt", "0.5")
    export_checkpoint(ExportConfig(model=str(ckpt), verify=False), root / "ort")
    export_checkpoint(ExportConfig(model=str(ckpt), verify=False, target="sparse-cpu"), root / "sparse-cpu")
    model = onnx.load(str(root / "ort" / "model.onnx"))
    (root / "external").mkdir()
    onnx.save_model(
        model,
        str(root / "external" / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    model = onnx.load(str(root / "ort" / "model.onnx"))
    (root / "external-constants").mkdir()  # Constant nodes' tensors in the external-data file too
    onnx.save_model(
        model,
        str(root / "external-constants" / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=16,  # ConstantOfShape's one-element tensor inline: ONNX Runtime reads no other form of it
        convert_attribute=True,
    )
    model = onnx.load(str(root / "ort" / "model.onnx"))  # saving with external data turned the tensors into references
    head = next(n for n in model.graph.node if "logits" in n.output)
    head.output[0] = "raw_logits"
    model.graph.node.append(helper.make_node("Tanh", ["raw_logits"], ["logits"], name="softcap"))
    (root / "softcap").mkdir()
    onnx.save(model, str(root / "softcap" / "model.onnx"))
    return root


def _temp_folders() -> set[str]:
    return set(glob.glob(f"{tempfile.gettempdir()}/sparsedeploy-last-logits-*"))


@pytest.mark.parametrize("form", ["ort", "external", "sparse-cpu"])
def test_the_last_row_is_the_full_graphs_last_row(exports, form):
    path = exports / form
    files, temps = sorted(p.name for p in path.iterdir()), _temp_folders()
    full = OnnxDecoder.load(path, threads=1)
    last = OnnxDecoder.load(path, threads=1, last_logits=True)
    assert last.last_logits and not full.last_logits
    assert isinstance(last.session, SegmentedSession) == (form == "sparse-cpu")
    ids = np.random.default_rng(1).integers(3, 250, (2, 7))
    mask = np.ones_like(ids)
    want, want_cache = full.run(ids, mask, None)
    got, cache = last.run(ids, mask, None)
    vocab = want.shape[-1]
    assert want.shape == (2, 7, vocab) and got.shape == (2, 1, vocab)
    np.testing.assert_allclose(got, want[:, -1:], rtol=0, atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(cache, want_cache, strict=True))  # the KV cache is untouched
    step, _ = last.run(ids[:, :1], np.ones((2, 8), np.int64), cache)  # a decode step: one position anyway
    np.testing.assert_allclose(step, full.run(ids[:, :1], np.ones((2, 8), np.int64), want_cache)[0], atol=1e-5)
    assert last.greedy(ids[:1], 6).tolist() == full.greedy(ids[:1], 6).tolist()
    declared = next(o for o in last.session.get_outputs() if o.name == "logits").shape
    assert declared[1] == 1
    # the edit happened in memory: nothing written beside the model, the temporary folder (external data) gone
    assert sorted(p.name for p in path.iterdir()) == files and _temp_folders() == temps


def test_a_kernel_run_lm_head_multiplies_the_last_row_only(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    model, _ = tied_graph(rng)
    pack_scaled_int8(model)  # the tied lm_head becomes an Int8Linear node, run by the kernels
    onnx.save(model, str(tmp_path / "model.onnx"))
    rows = []
    call = native.BoundInt8Matmul.__call__
    monkeypatch.setattr(native.BoundInt8Matmul, "__call__", lambda self, x: rows.append(x.shape[0]) or call(self, x))
    ids = rng.integers(0, 50, (2, 9))
    full = session_from_path(tmp_path / "model.onnx", threads=1)
    want_logits, want_emb = full.run(None, {"ids": ids})
    assert rows == [18, 18]  # up projection, lm_head: every position
    rows.clear()
    last = session_from_path(tmp_path / "model.onnx", threads=1, last_logits=True)
    logits, emb = last.run(None, {"ids": ids})
    assert rows == [18, 2]  # the lm_head on the last position of each of the 2 sequences
    assert logits.shape == (2, 1, 50) and np.array_equal(emb, want_emb)
    np.testing.assert_allclose(logits, want_logits[:, -1:], rtol=0, atol=1e-5 * np.abs(want_logits).max())
    assert not any(n.op_type == "Slice" for s in last.steps for n in getattr(s, "nodes", []))  # no graph edit


def test_a_kernel_run_lm_head_is_sliced_in_the_graph_when_onnx_runtime_runs_it_whole(tmp_path, ort_op_library):
    """With the custom-op library the Int8Linear lm_head runs inside ONNX Runtime: the Slice goes in the graph."""
    rng = np.random.default_rng(0)
    model, _ = tied_graph(rng)
    pack_scaled_int8(model)
    onnx.save(model, str(tmp_path / "model.onnx"))
    ids = rng.integers(0, 50, (2, 9))
    want_logits, want_emb = session_from_path(tmp_path / "model.onnx", threads=1).run(None, {"ids": ids})
    last = session_from_path(tmp_path / "model.onnx", threads=1, last_logits=True, custom_op_library=ort_op_library)
    logits, emb = last.run(None, {"ids": ids})
    assert logits.shape == (2, 1, 50) and np.array_equal(emb, want_emb)
    np.testing.assert_allclose(logits, want_logits[:, -1:], rtol=0, atol=1e-5 * np.abs(want_logits).max())
    edited = onnx.load(str(tmp_path / "model.onnx"))
    keep_last_position_logits(edited)
    head = next(n for n in edited.graph.node if "logits" in n.output)
    assert head.op_type == "Int8Linear" and head.input[0].endswith("/last_position")


def test_a_graph_whose_logits_are_not_a_plain_lm_head_is_refused_and_generation_falls_back(exports):
    file = exports / "softcap" / "model.onnx"
    model = onnx.load(str(file))
    before = model.SerializeToString()
    with pytest.raises(ValueError, match="comes from a Tanh node"):
        keep_last_position_logits(model)
    assert model.SerializeToString() == before  # refused before any edit
    with pytest.raises(LastLogitsUnavailable, match="softcap/model.onnx: `logits` comes from a Tanh node"):
        session_from_path(file, threads=1, last_logits=True)
    decoder = OnnxDecoder.load(file, threads=1, last_logits=True)
    ids = np.array([[5, 6, 7]])
    assert not decoder.last_logits and decoder.run(ids, np.ones_like(ids), None)[0].shape[:2] == (1, 3)
    # bench: both variants compute the same logits, so one that cannot be cut makes both compute every position's
    cfg = BenchConfig(model=str(file), baseline=str(exports / "ort"))
    models, form = load_models(cfg, {"dense": exports / "ort" / "model.onnx", "sparse": file})
    assert form == "all logits" and not any(m.decoder.last_logits for m in models.values())
    models, form = load_models(cfg, {"dense": exports / "ort" / "model.onnx", "sparse": exports / "sparse-cpu"})
    assert form == "last-position logits" and all(m.decoder.last_logits for m in models.values())


def test_external_constant_tensors_are_read_into_the_edited_graph(exports):
    model = onnx.load(str(exports / "external-constants" / "model.onnx"), load_external_data=False)
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")]
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in constants)  # the form the test is about
    last = OnnxDecoder.load(exports / "external-constants", threads=1, last_logits=True)
    assert last.last_logits and len(last.session.sparsedeploy_weight_maps) > 0  # the weights still memory-mapped
    full = OnnxDecoder.load(exports / "ort", threads=1)  # (ONNX Runtime cannot load this form from its path)
    ids = np.random.default_rng(2).integers(3, 250, (1, 5))
    got, want = last.run(ids, np.ones_like(ids), None)[0], full.run(ids, np.ones_like(ids), None)[0]
    np.testing.assert_allclose(got, want[:, -1:], rtol=0, atol=1e-5)


def test_corrupt_packed_weights_are_one_clear_error_not_a_silent_fallback(exports, tmp_path):
    model = onnx.load(str(exports / "sparse-cpu" / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "SparseLinear")
    widths = next(a for a in node.attribute if a.name == "widths")
    widths.ints[0] += 1  # the fused outputs no longer add up to the packed weight's rows
    onnx.save(model, str(tmp_path / "model.onnx"))
    for last in (False, True):
        with pytest.raises(UserError, match=r"model.onnx's packed weights: SparseLinear node .* do not add up") as err:
            OnnxDecoder.load(tmp_path, threads=1, last_logits=last)
        assert not isinstance(err.value, LastLogitsUnavailable)  # not taken for an lm_head that cannot be cut


def test_the_bench_fallback_reloads_only_the_models_that_were_cut(exports, monkeypatch):
    import sparsedeploy.bench.ort as bench_ort

    loads = []
    real = bench_ort.OnnxDecoder.load

    def spy(path, threads=None, optimization="all", last_logits=False, custom_op_library=None):
        loads.append((Path(path).parent.name, last_logits))
        return real(path, threads, optimization, last_logits, custom_op_library)

    monkeypatch.setattr(bench_ort.OnnxDecoder, "load", spy)
    cfg = BenchConfig(model=str(exports / "softcap"), baseline=str(exports / "ort"))
    models, form = load_models(
        cfg, {"dense": exports / "ort" / "model.onnx", "sparse": exports / "softcap" / "model.onnx"}
    )
    assert form == "all logits" and not any(m.decoder.last_logits for m in models.values())
    assert loads == [("ort", True), ("softcap", True), ("ort", False)]  # the soft-capped one is not loaded again


def test_truncated_external_data_is_one_clear_error(exports, tmp_path):
    for name in ("model.onnx", "weights.bin"):
        (tmp_path / name).write_bytes((exports / "external" / name).read_bytes())
    with open(tmp_path / "weights.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(UserError, match=r"cannot read the external data of ONNX model .*model.onnx: .*export it again"):
        session_from_path(tmp_path, threads=1, last_logits=True)
