"""The exporters: optimum's I/O names, loadable by optimum's ORTModel; the torch fallback with the same names."""

from __future__ import annotations

from pathlib import Path

from sparsedeploy.export.run import ExportConfig, export_checkpoint


def _onnx_io(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def test_io_names_follow_optimum(pruned_exports):
    inputs, outputs = _onnx_io(pruned_exports["0.5"][0])
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]


def test_loads_in_optimum_ortmodel(pruned_exports):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    out, report = pruned_exports["2:4"]
    model = ORTModelForCausalLM.from_pretrained(str(out))
    prompt = report["verification"]["parity"]["prompts"][0]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(out))(prompt["prompt"], return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    assert generated[0, ids.shape[1] :].tolist() == prompt["onnx_tokens"][:8]


def test_torch_fallback_has_the_same_names_and_verifies(pruned_checkpoints, pruned_exports, tmp_path):
    report = export_checkpoint(
        ExportConfig(model=str(pruned_checkpoints["2:4"]), exporter="torch", greedy_tokens=8), tmp_path / "t"
    )
    assert report["exporter"] == "torch" and report["verification"]["ok"], report["verification"]["problems"]
    assert _onnx_io(tmp_path / "t") == _onnx_io(pruned_exports["2:4"][0])


def test_auto_exporter_falls_back_to_torch_for_a_model_type_optimum_does_not_know(
    pruned_checkpoints, tmp_path, monkeypatch
):
    import sparsedeploy.export.run as export_mod
    from sparsedeploy.export.exporters import optimum_supports

    assert optimum_supports(
        pruned_checkpoints["0.5"], "text-generation-with-past"
    )  # llama: optimum's exporter by default
    monkeypatch.setattr(export_mod, "optimum_supports", lambda _dir, _task: False)
    report = export_checkpoint(ExportConfig(model=str(pruned_checkpoints["0.5"]), greedy_tokens=4), tmp_path / "t")
    assert report["exporter"] == "torch" and report["verification"]["ok"]
