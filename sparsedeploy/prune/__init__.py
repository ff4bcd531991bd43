"""Pruning: the calibration walk over decoder blocks, the methods, the driver, allocation, checkpoints,
offload, recovery."""
