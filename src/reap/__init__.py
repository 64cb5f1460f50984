"""reap: one-shot expert pruning (REAP) for Mixture-of-Experts checkpoints."""

__version__ = "0.1.0"
