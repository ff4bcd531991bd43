"""Benchmarks: whole-model dense-vs-sparse timing per engine, MatMul/linear benchmarks, the bench report."""
