"""Inference engines driven by `sparsedeploy bench`: ONNX Runtime (in-process), DeepSparse (own venv, subprocess), torch."""
