"""ONNX files: storage (dense/sparse), the one ORT session factory, the one decoder runner, verification, inspect."""
