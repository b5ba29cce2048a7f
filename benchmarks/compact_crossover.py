"""Compact weights against float32 by rows per call: where compact weights stop paying.

One engine per weights form (float32, float16, int8) of one random layer, 100,000 open
streams each; for each row count, 16 batches of distinct random keys are stepped through every
engine in turn, 7 times, and the median time per call is reported with the float32 / compact
ratios. One thread. Run::

    .venv/bin/python benchmarks/compact_crossover.py gru 256 [1,2,4,8,16,32,64,256,1024,4096]
"""

from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from streamgru import Engine, GRUModel  # noqa: E402
from streamgru.isa import TILE  # noqa: E402

FORMS = ("float32", "float16", "int8")
STREAMS = 100_000


def main(cell="gru", H=256, ns=(1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096)):
    print(TILE.describe(), cell, "H", H)
    model = GRUModel.random(H, [H], cell=cell, seed=0)
    engines = {f: Engine(model, threads=1, weights=f, capacity=STREAMS) for f in FORMS}
    rng = np.random.default_rng(0)
    for e in engines.values():
        for i in range(0, STREAMS, 4096):
            keys = np.arange(i, min(STREAMS, i + 4096), dtype=np.int64)
            e.step(keys, np.zeros((len(keys), H), np.float32))
    print(f"{'n':>5} " + " ".join(f"{f:>9}" for f in FORMS) + "   f32/f16  f32/int8")
    for n in ns:
        batches = [(rng.choice(STREAMS, n, replace=False).astype(np.int64),
                    rng.normal(size=(n, H)).astype(np.float32)) for _ in range(16)]
        reps = max(1, int(2e5 / (n * H * H / 1000 + 50)))
        times = {f: [] for f in FORMS}
        for e in engines.values():
            for k, x in batches[:2]:
                e.step(k, x)
        for _ in range(7):
            for f, e in engines.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    for k, x in batches:
                        e.step(k, x)
                times[f].append((time.perf_counter() - t0) / reps / len(batches) * 1e6)
        med = {f: float(np.median(v)) for f, v in times.items()}
        print(f"{n:>5} " + " ".join(f"{med[f]:>9.1f}" for f in FORMS)
              + f"   {med['float32'] / med['float16']:>7.2f}  {med['float32'] / med['int8']:>7.2f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "gru", int(args[1]) if len(args) > 1 else 256,
         tuple(int(v) for v in args[2].split(",")) if len(args) > 2 else
         (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096))
