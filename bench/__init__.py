"""Benchmarks: each writes bench/results/<name>.json; `python -m bench` runs them all."""
