"""The docs tables generated from the vocabularies (scripts/gen_docs_tables.py) match the committed docs."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def _module():
    spec = importlib.util.spec_from_file_location("gen_docs_tables", REPO / "scripts" / "gen_docs_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_docs_are_what_the_generator_writes():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_docs_tables.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"run python scripts/gen_docs_tables.py and commit the docs:\n{proc.stderr}"


def test_a_stale_table_is_found_and_rewritten(tmp_path):
    mod = _module()
    for rel in set(mod.REGIONS.values()):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    assert mod.stale(tmp_path) == []
    export_md = tmp_path / "docs" / "export.md"
    text = export_md.read_text(encoding="utf-8")
    export_md.write_text(text.replace("| `tensorrt` | 17 |", "| `tensorrt` | 16 |"), encoding="utf-8")
    assert mod.stale(tmp_path) == [export_md]
    assert mod.generated(tmp_path)[export_md] == text  # outside the regions nothing changes


def test_tables_follow_the_vocabularies():
    from sparsedeploy.bench.config import ENGINES
    from sparsedeploy.export.config import TARGETS
    from sparsedeploy.prune.choices import ALLOCATIONS
    from sparsedeploy.prune.method_options import METHOD_NAMES, METHOD_OPTIONS

    mod = _module()
    methods = mod.methods_table()
    assert all(f"| `{name}` |" in methods for name in METHOD_NAMES)
    assert all(f"| `{o.key}` |" in methods for o in METHOD_OPTIONS)
    assert "`wanda+dsnot`" in methods and "| `--blocksize` | `sparsegpt`, `dsnot` |" in methods
    assert [line.split("|")[1].strip() for line in mod.export_targets_table().splitlines()[2:]] == [
        f"`{t}`" for t in TARGETS
    ]
    assert len(mod.bench_engines_table().splitlines()) == 2 + len(ENGINES)
    assert len(mod.allocations_table().splitlines()) == 2 + len(ALLOCATIONS)


def test_a_missing_region_is_an_error():
    mod = _module()
    with pytest.raises(ValueError, match="generated:methods: 0 marked regions"):
        mod.render("no markers here\n", "methods", "| a |")
