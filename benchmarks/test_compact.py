"""Compact weights (``Engine(weights="float16" | "int8")``) against the float32 engine and
onnxruntime, in the same run: one pytest-benchmark group per workload, one benchmark per
contender (``streamgru`` is the float32 engine).

The workloads are the compact-weights issue's targets: one stream (n=1) at H=256 and H=512,
where a step streams every weight once and the weights' bytes decide, and many streams (4096
of 100,000) at H=128 and H=256, where the products are compute-bound and each weight is
converted once per row block. GRU and LSTM, 1 thread. ``make test`` runs a reduced grid once
with ``--benchmark-disable``; timings are never asserted (benchmarks/RESULTS.md quotes them).
"""

import pytest
import workloads as W
from conftest import REMOVED_ENV

from streamgru.harness.bench import CELLS, cell_of, machine_info, make_model, workload

INFO = machine_info()
CONTENDERS = ("streamgru", "streamgru_float16", "streamgru_int8", "ort_run")


def _workloads():
    if W.full():
        specs = [(256, 256, 1, {}), (512, 512, 1, {}), (128, 128, 4096, {"streams": 100_000}),
                 (256, 256, 4096, {"streams": 100_000})]
    else:
        specs = [(64, 64, 1, {}), (32, 32, 64, {"streams": 1000})]
    return [workload(I, H, n, cell=cell, **f) for cell in CELLS for I, H, n, f in specs]


CASES = [(wl, c) for wl in _workloads() for c in CONTENDERS]


@pytest.mark.parametrize("case", CASES, ids=[f"{wl.name.replace(' ', '_')}-{c}" for wl, c in CASES])
def test_compact_weights(benchmark, case):
    wl, name = case
    model = make_model(wl)
    try:
        c = W.contender(name, model, 1)
    except ImportError as exc:
        pytest.skip(f"{name}: {exc}")
    benchmark.group = f"compact {wl.name}"
    benchmark.extra_info.update({k: INFO[k] for k in ("cpu", "cores", "numba", "numpy", "tile")})
    benchmark.extra_info.update(c.info())
    benchmark.extra_info.update(contender=name, threads=1, removed_env=REMOVED_ENV, events=wl.n,
                                cell=cell_of(model))
    W.time_steps(benchmark, c, wl, model.output_size)
