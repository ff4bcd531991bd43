"""Inference runtimes outside ONNX Runtime's plain session: generation loops, DeepSparse (own venv), TensorRT."""
