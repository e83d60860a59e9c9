"""Benchmarks of strands-dedup (run them from the repository root with ``python -m``)."""
