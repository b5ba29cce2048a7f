"""Step latency: streamgru vs onnxruntime vs PyTorch, one group per workload.

Run: make bench (or: .venv/bin/python -m pytest benchmarks --benchmark-only).
In `make test` this file runs once with --benchmark-disable so it cannot rot.
"""

import numpy as np
import pytest

from streamgru import Engine, GRUModel

WORKLOADS = [(16, 64, 1), (128, 128, 1), (128, 128, 64)]


@pytest.mark.parametrize("I,H,n", WORKLOADS, ids=[f"I{i}-H{h}-n{n}" for i, h, n in WORKLOADS])
def test_streamgru_step(benchmark, I, H, n):
    benchmark.group = f"step I={I} H={H} n={n}"
    model = GRUModel.random(I, [H], seed=0)
    eng = Engine(model, threads=1)
    keys = list(range(n))
    x = np.random.default_rng(0).normal(size=(n, I)).astype(np.float32)
    eng.step(keys, x)  # compile and open the streams outside the timing
    benchmark.extra_info.update(threads=1, dtype="float32")
    y = benchmark(eng.step, keys, x)
    assert y.shape == (n, H) and np.isfinite(y).all()
