"""Benchmarks of lightning-dwf against shallow factorization and pruning (run as ``python -m benchmarks.<name>``)."""
