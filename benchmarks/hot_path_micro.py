"""Five hot-path cases timed call by call, for before/after comparisons of kernel changes.

Run it for two trees in alternation and compare the medians (RESULTS.md, "Hot path before and
after the layer loops written once per kernel family")::

    cd /tmp && PYTHONPATH=<tree> python <tree>/benchmarks/hot_path_micro.py

Prints one JSON line: case -> median microseconds per call (1 thread, float32, seeded models).
"""

import json
import time

import numpy as np

from streamgru import Engine, GRUModel


def median_us(call, n, warmup=50):
    """Median wall time of ``call()`` over ``n`` calls, in microseconds."""
    for _ in range(warmup):
        call()
    ts = []
    for _ in range(n):
        t = time.perf_counter_ns()
        call()
        ts.append(time.perf_counter_ns() - t)
    return float(np.median(ts)) / 1e3


def main():
    rng = np.random.default_rng(0)
    res = {}
    e = Engine(GRUModel.random(16, [64], dense_after=[(4, "softmax")], seed=1), threads=1)
    xs = rng.standard_normal((100, 16)).astype(np.float32)
    res["run I16 H64 T100"] = median_us(lambda: e.run(7, xs), 3000)
    e = Engine(GRUModel.random(128, [128], seed=2), threads=1)
    keys, x = np.arange(16), rng.standard_normal((16, 128)).astype(np.float32)
    res["step n16 H128"] = median_us(lambda: e.step(keys, x), 3000)
    xs2 = rng.standard_normal((100, 128)).astype(np.float32)
    res["run I128 H128 T100"] = median_us(lambda: e.run(3, xs2), 1500)
    e = Engine(GRUModel.random(32, [128, 128], dense_before=[(128, "relu")],
                               dense_after=[(16, "softmax")], seed=3), threads=1)
    keys64, x64 = np.arange(64), rng.standard_normal((64, 32)).astype(np.float32)
    res["stack n64"] = median_us(lambda: e.step(keys64, x64), 1500)
    e = Engine(GRUModel.random(16, [64], seed=4), threads=1)
    x1 = rng.standard_normal((1, 16)).astype(np.float32)
    e.step([5], x1)
    res["step n1 H64"] = median_us(lambda: e.step([5], x1), 20000)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
