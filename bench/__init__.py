"""Benchmark of the live pipeline against a naive astroalign baseline (see bench/run.py)."""
