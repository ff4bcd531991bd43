"""sparsedeploy's own native CPU kernels (C, C ABI, run-time ISA dispatch) and the compressed weight format they read."""
