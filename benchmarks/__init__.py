"""Benchmarks: machine-readable timings of the data path, apart from the tests."""
