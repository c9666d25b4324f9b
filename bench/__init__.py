"""Benchmarks (run with `slidr bench ...`)."""
