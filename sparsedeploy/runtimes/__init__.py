"""Inference runtimes outside ONNX Runtime's plain session: generation loops, DeepSparse (own venv), TensorRT."""

# What `sparsedeploy generate --engine` runs an export in (the one list: the CLI's choices come from it).
GENERATE_ENGINES = ("ort", "sparse-cpu", "deepsparse")
