"""Benchmark scripts: each prints figures measured against a baseline taken in the same run."""
