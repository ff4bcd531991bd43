"""Export: a pruned checkpoint to ONNX (the targets, their forms and the export report)."""
