"""Seeded workloads and contenders for the pytest-benchmark suite (shared with `streamgru bench`).

The workloads, the fair user-side state store and the onnxruntime / PyTorch contenders live in
:mod:`streamgru.harness.bench`; this module adds the float64 numpy oracle (tests/oracle.py) as a contender
and picks the grid: the full one, or a reduced one for the smoke run (``--benchmark-disable``).
Both hold every workload once per recurrent cell (``CELLS``: GRU, LSTM).
"""

import os

import numpy as np
import oracle

from streamgru.harness.bench import (
    CELLS,
    UserStore,
    UserStoreContender,
    make_contender,
    standard_workloads,
    workload,
)

CONTENDERS = ("streamgru", "ort_run", "ort_iobinding", "torch", "numpy_oracle")


def full():
    return os.environ.get("STREAMGRU_BENCH", "full") == "full"


def workloads():
    if full():
        return standard_workloads(quick=False)
    # Smoke: every kind of workload once per cell, small enough that building every contender
    # and running each body once takes seconds.
    specs = [(16, 64, 1, {}), (32, 64, 16, {}), (32, 64, 256, {"streams": 5000}),
             (16, 32, 8, {"layers": "stack"}), (16, 32, 16, {"keys": "duplicates"}),
             (16, 32, 64, {"streams": 5000, "keys": "zipf"}), (16, 64, 1, {"seq": 100})]
    return [workload(I, H, n, cell=cell, **fields) for cell in CELLS for I, H, n, fields in specs]


def thread_counts():
    return sorted({1, os.cpu_count() or 1}) if full() else [1]


class OracleContender(UserStoreContender):
    """The float64 numpy reference (tests/oracle.py) behind the same gather/run/scatter store."""

    name = "numpy_oracle"

    def __init__(self, model, threads):
        super().__init__(model, threads)
        self.store = UserStore(model.state_size, 1)
        self.store.states = self.store.states.astype(np.float64)

    def _step_rows(self, slots, x):
        states = self.store.states
        y, new = oracle.step(self.model, states[slots], x)
        states[slots] = new
        return y

    def info(self):
        return {"threads": self.threads, "blas": "numpy (OpenBLAS)", "dtype": "float64"}


def contender(name, model, threads):
    if name == "numpy_oracle":
        return OracleContender(model, threads)
    return make_contender(name, model, threads)


def time_steps(benchmark, c, wl, output_size):
    """Time contender ``c``'s ``step`` over the workload's seeded batches (opened and warmed up
    outside the timing), one batch per call; check the last output's shape and finiteness."""
    from streamgru.harness.bench import batches

    bs = batches(wl, 8)
    c.open(np.arange(wl.n_streams))
    c.step(*bs[0])
    it = iter(range(1 << 62))

    def one_call():
        keys, x = bs[next(it) % len(bs)]
        return c.step(keys, x)

    y = benchmark(one_call)
    assert y.shape[1] == output_size and np.isfinite(y).all()
