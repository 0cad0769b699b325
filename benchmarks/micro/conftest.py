"""Microbenchmarks run only when asked for: ``pytest benchmarks/micro --benchmark-only``.

Collected by accident (``pytest .``), every item is skipped instead of spending minutes timing.
"""
import pytest


def pytest_collection_modifyitems(config, items):
    try:
        asked = config.getoption("benchmark_only") or config.getoption("benchmark_enable", default=False)
    except ValueError:                                   # pytest-benchmark not installed
        asked = False
    if asked:
        return
    skip = pytest.mark.skip(reason="microbenchmark: run with `pytest benchmarks/micro --benchmark-only`")
    for item in items:
        item.add_marker(skip)
