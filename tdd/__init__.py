"""tdd: Target-Driven Distillation and its baselines as one ablation framework."""

__version__ = "0.1.0"
