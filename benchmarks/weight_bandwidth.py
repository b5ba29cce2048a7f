"""How fast one stream's products can read a GRU layer's weights, by layer size (the n=1 bound).

A single-stream step multiplies one input row and one state row by every weight once:
3H x (I + H) values for I = H, in each weights form (float32, float16, int8). This times
exactly those two products (the engine's own micro-kernel for one row, ``kernels._gemv``, as
the one-event kernel calls it) in a compiled loop, with no Python between steps, and reports
the rate at which the weights stream through the core. Where the weights stop fitting in the
core's L2 the rate drops to what the L3 delivers, and that rate, not the arithmetic, bounds a
one-stream step on one core, unless converting compact weights costs more.

Run::

    .venv/bin/python benchmarks/weight_bandwidth.py
"""

from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from streamgru import Engine, GRUModel  # noqa: E402
from streamgru import kernels as K  # noqa: E402


@njit(cache=False)
def _products(params, fp, table, scratch, reps):
    """reps x (W x + Wb, R h + Rb) for the one row of scratch, as a one-stream step does."""
    row = np.int64(0)
    for _ in range(reps):
        K._gemv(params, fp, table, row, K.T_W, table[0, K.T_IN], scratch, row, table[0, K.T_LA],
                scratch, row, table[0, K.T_LGX], False)
        K._gemv(params, fp, table, row, K.T_R, table[0, K.T_OUT], scratch, row,
                table[0, K.T_LHH], scratch, row, table[0, K.T_LGH], False)


def main(sizes=(32, 64, 128, 192, 256, 384, 512), forms=("float32", "float16", "int8")):
    print(f"{'H = I':>6} {'weights':>8} {'KiB':>7} {'us per step':>12} {'GB/s':>7} {'GFLOP/s':>8}")
    for H in sizes:
        for form in forms:
            packed = Engine(GRUModel.random(H, H, seed=1), threads=1, weights=form)._packed
            scratch = np.full((2, packed.scratch_width), 0.01, np.float32)
            _products(packed.params, packed.fp, packed.table, scratch, 3)
            reps = max(20, int(3e7 / (6 * H * H)))
            best = np.inf
            for _ in range(5):
                t0 = time.perf_counter()
                _products(packed.params, packed.fp, packed.table, scratch, reps)
                best = min(best, (time.perf_counter() - t0) / reps)
            nbytes = packed.params.nbytes
            print(f"{H:>6} {form:>8} {nbytes / 1024:>7.0f} {best * 1e6:>12.2f} "
                  f"{nbytes / best / 1e9:>7.0f} {2 * 6 * H * H / best / 1e9:>8.0f}")


if __name__ == "__main__":
    main(*([tuple(int(a) for a in sys.argv[1].split(","))] if len(sys.argv) > 1 else []))
