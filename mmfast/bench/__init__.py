"""Benchmarks: ``python -m mmfast.bench``."""
