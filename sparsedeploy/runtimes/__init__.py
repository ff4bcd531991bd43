"""Inference runtimes that run a pruned model's exported artifact (sparse_cpu: the project's own sparse CPU kernels)."""
