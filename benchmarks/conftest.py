"""Benchmark configuration.

* ``pytest benchmarks --benchmark-only``: the full grid (every n x H of the issue, 1 and 2 threads).
* ``pytest benchmarks --benchmark-disable`` (CI smoke run): a reduced grid, each body once.
* ``STREAMGRU_BENCH=full`` / ``=smoke`` forces either grid.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed from this process's environment before numpy
loads (so OpenBLAS, used only by the numpy-oracle contender, picks its best kernel); the values
removed are recorded in every benchmark's ``extra_info``.
"""

import os
import pathlib
import sys

REMOVED_ENV = {k: os.environ.pop(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
               if k in os.environ}

# Share the float64 oracle and helpers with the test suite.
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))


def pytest_configure(config):
    mode = os.environ.get("STREAMGRU_BENCH")
    if mode not in ("full", "smoke"):
        disabled = config.getoption("benchmark_disable", default=False)
        mode = "smoke" if disabled else "full"
    os.environ["STREAMGRU_BENCH"] = mode
