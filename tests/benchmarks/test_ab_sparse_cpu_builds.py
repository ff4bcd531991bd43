"""Two sparse-cpu builds side by side: the pairs it times, its refusal of a build that computes another y, bad input."""

import json
import os
import subprocess
import sys

from conftest import REPO

from sparsedeploy.kernels.native import library_path

TOOL = [sys.executable, str(REPO / "benchmarks" / "ab_sparse_cpu_builds.py")]

# A build that runs the real kernels and then changes y[0, 0] by 0.01: what a kernel change with a wrong edge or tail
# looks like from outside. It forwards the three entry points the tool calls to the library named by AB_REAL_LIB.
WRONG_BUILD = r"""
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
static void *real;
static void *sym(const char *name) {
    if (!real) real = dlopen(getenv("AB_REAL_LIB"), RTLD_NOW | RTLD_LOCAL);
    return real ? dlsym(real, name) : NULL;
}
void *sdk_linear_new(const void *m, const void *v, const void *b, int64_t n, int64_t k) {
    void *(*f)(const void *, const void *, const void *, int64_t, int64_t) = sym("sdk_linear_new");
    return f ? f(m, v, b, n, k) : NULL;
}
void sdk_linear_free(void *w) {
    void (*f)(void *) = sym("sdk_linear_free");
    if (f) f(w);
}
int sdk_linear_matmul(void *w, const float *x, int64_t b, float *y, int threads, int isa, int form) {
    int (*f)(void *, const float *, int64_t, float *, int, int, int) = sym("sdk_linear_matmul");
    const int rc = f ? f(w, x, b, y, threads, isa, form) : -1;
    y[0] += 0.01f;
    return rc;
}
"""


def run(*args, timeout=300, env=None):
    return subprocess.run([*TOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_the_same_build_on_both_sides_gives_pairs_around_one(tmp_path):
    proc = run(
        "installed",
        str(library_path()),
        "--shapes",
        "576x192",
        "--patterns",
        "0.5,2:4",
        "--batches",
        "1,65",
        "--rounds",
        "2",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "ab_sparse_cpu_builds.json").read_text())
    assert result["a"] == result["b"] == str(library_path())
    rows = result["rows"]
    assert [(r["pattern"], r["batch"]) for r in rows] == [("0.5", 1), ("0.5", 65), ("2:4", 1), ("2:4", 65)]
    for r in rows:
        assert r["pairs"] == 2 * r["copies"] and r["copies"] >= 2  # rounds x copies, each copy once a round
        assert r["q1"] <= r["ratio"] <= r["q3"] and 0.2 < r["ratio"] < 5  # the same code: no order of magnitude
        assert r["a_ms"] > 0 and r["b_ms"] > 0
    md = (tmp_path / "ab_sparse_cpu_builds.md").read_text()
    assert md.count("| 576x192 |") == 4 and "above 1, B is faster" in md


def test_a_build_that_computes_another_y_is_refused(tmp_path):
    src = tmp_path / "wrong.c"
    src.write_text(WRONG_BUILD)
    lib = tmp_path / "_native_wrong.so"
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"], check=True)
    env = {**os.environ, "AB_REAL_LIB": str(library_path())}
    out = tmp_path / "out"
    proc = run(
        "installed",
        str(lib),
        "--shapes",
        "576x192",
        "--patterns",
        "0.5",
        "--batches",
        "8",
        "--rounds",
        "2",
        "--out",
        str(out),
        env=env,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: B's output differs from A's on 576x192 0.5 batch 8")
    assert "max |B - A| 0.01" in proc.stderr
    assert not out.exists()  # nothing written for a run that stopped


def test_bad_input_is_one_error_line_and_exit_2(tmp_path):
    out = tmp_path / "out"
    cases = [
        (["installed", str(tmp_path / "missing.so")], "no such library or repository copy"),
        (["installed", str(tmp_path)], "no compiled library in"),
        (["installed", str(REPO / "README.md")], "not a sparse-cpu library"),
        (["installed", "installed", "--shapes", "9x9"], "unknown shape '9x9'"),
        (["installed", "installed", "--patterns", "0.5,abc"], "cannot read sparsity 'abc'"),
        (["installed", "installed", "--rounds", "1"], "--rounds must be at least 2"),
    ]
    for args, message in cases:
        proc = run(*args, "--out", str(out), timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, proc.stderr)
    assert not out.exists()
