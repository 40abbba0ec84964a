"""Benchmarks (hare bench ...)."""
