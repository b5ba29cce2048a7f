"""streamgru vs onnxruntime (run, run_with_iobinding) vs PyTorch vs the numpy oracle.

One pytest-benchmark group per workload (every workload once with GRU layers and once with LSTM
layers: ``step I=16 H=64 n=1``, ``step lstm I=16 H=64 n=1``); inside it one benchmark per
contender and thread count, so the table compares like with like. Each benchmark's
``extra_info`` says its ``cell`` and every contender's thread settings. Run the full grid with
``make bench`` (or ``pytest benchmarks --benchmark-only``); ``make test`` runs a reduced grid
once with ``--benchmark-disable`` so the suite cannot rot. Timings are never asserted.

The baselines do what a user must do around onnxruntime/torch: look the keys up in a store,
gather the batch's states, run, scatter the new states back (``streamgru.harness.bench.UserStore``).
"""

import numpy as np
import pytest
import workloads as W
from conftest import REMOVED_ENV

from streamgru.harness.bench import cell_of, machine_info, make_model

INFO = machine_info()
CASES = [(wl, c, t) for wl in W.workloads() for t in W.thread_counts() for c in W.CONTENDERS
         if not (wl.seq and c == "ort_iobinding")]
CASES += [(wl, "ort_sequence", t) for wl in W.workloads() if wl.seq for t in W.thread_counts()]


def _id(case):
    wl, c, t = case
    return f"{wl.name.replace(' ', '_')}-{c}-{t}t"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_workload(benchmark, case):
    wl, name, threads = case
    model = make_model(wl)
    try:
        c = W.contender(name, model, threads)
    except ImportError as exc:
        pytest.skip(f"{name}: {exc}")
    benchmark.group = wl.name
    benchmark.extra_info.update({k: INFO[k] for k in ("cpu", "cores", "numba", "numpy", "tile")})
    benchmark.extra_info.update(c.info())
    benchmark.extra_info.update(contender=name, threads=threads, removed_env=REMOVED_ENV,
                                events=wl.seq or wl.n, cell=cell_of(model))
    if wl.seq:
        xs = np.random.default_rng(1).normal(size=(wl.seq, wl.input_size)).astype(np.float32)
        c.open(np.array([0]))
        c.run(0, xs)  # compile / warm up outside the timing
        ys = benchmark(c.run, 0, xs)
        assert ys.shape == (wl.seq, model.output_size)
        return
    W.time_steps(benchmark, c, wl, model.output_size)
