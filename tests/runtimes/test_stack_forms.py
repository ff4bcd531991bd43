"""Which static forms a bench needs, their names, and the lookup in an export's static_forms list (no model needed)."""

from __future__ import annotations

import json

import pytest

from sparsedeploy.runtimes import stack_forms as sf


def test_bench_specs_list_each_form_once():
    specs = sf.bench_specs([1, 8], 128, 64)
    assert len(specs) == len(set(specs)) == 8  # per batch: prefill, step over 128, step over 192, head
    assert sf.FormSpec(sf.STEP, 8, 1, 192) in specs and sf.FormSpec(sf.HEAD, 1, 128, 192) in specs
    assert sf.bench_specs([2], 16, 0) == [sf.FormSpec(sf.PREFILL, 2, 16, 0), sf.FormSpec(sf.STEP, 2, 1, 16)]
    names = {spec.file_name() for spec in specs}
    assert len(names) == 8 and "stack_step_b8_c192.onnx" in names and "stack_head_b1_s128_c192.npz" in names


def test_find_form_reads_the_report_and_checks_the_file(tmp_path):
    spec = sf.FormSpec(sf.PREFILL, 1, 8, 0)
    path = tmp_path / spec.file_name()
    path.write_bytes(b"12345")
    (tmp_path / (path.name + "_data")).write_bytes(b"678")  # external data counts
    manifest = {"files": [sf.entry(spec, path)]}
    assert manifest["files"][0]["bytes"] == 8
    (tmp_path / "export_report.json").write_text(json.dumps({sf.MANIFEST_KEY: manifest}))
    assert sf.read_manifest(tmp_path) == manifest
    assert sf.find_form(tmp_path, manifest, spec) == path
    with pytest.raises(sf.MissingForm, match="not exported"):
        sf.find_form(tmp_path, manifest, sf.FormSpec(sf.PREFILL, 2, 8, 0))
    path.write_bytes(b"1234")
    with pytest.raises(sf.MissingForm, match="has 7 bytes, export_report.json says 8"):
        sf.find_form(tmp_path, manifest, spec)
    path.unlink()
    with pytest.raises(sf.MissingForm, match="listed in export_report.json but missing"):
        sf.find_form(tmp_path, manifest, spec)
    (tmp_path / "export_report.json").write_text(json.dumps({"model": "x"}))
    assert sf.read_manifest(tmp_path) is None and sf.read_manifest(tmp_path / "nowhere") is None
