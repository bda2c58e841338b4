"""Benchmarks: every number is a median with a baseline measured in the same run."""
