"""Benchmarks: python -m benchmarks.run --suite=cpu|gpu (run.py); the single-purpose scripts beside it."""
