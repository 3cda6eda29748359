"""Reproducible training benchmarks (see benchmarks/README.md)."""
