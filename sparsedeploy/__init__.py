"""sparsedeploy: prune a pretrained causal LLM without retraining, check its quality, ship it."""

__version__ = "0.1.0"
