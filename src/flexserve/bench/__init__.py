"""Benchmarks: load generators, scenarios and the JSON reports they write."""
