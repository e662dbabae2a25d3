"""Observation: the sparsity report (metrics, the table; no Lightning) and the pictures for TensorBoard and W&B."""
