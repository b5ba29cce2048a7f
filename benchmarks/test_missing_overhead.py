"""What missing-value policies (Engine(missing=...)) cost on calls without NaN.

A clean call takes the same kernels under every policy (the kernels' finite scan finds a NaN
before changing anything, and only then does a call leave the clean path), so the contenders are:

* ``before``: engine.py with the clean path's one missing-value statement removed (the
  ``store.last`` check and, under "last", the memory copy), imported from a copy of the package
  named ``streamgru_nomissing`` (built from the current source on every run, as
  test_metrics_overhead.py builds its baseline);
* ``refuse``, ``skip``, ``zero``, ``last``: the engine as shipped (a copy,
  ``streamgru_metrics``), with that policy. "last" copies each clean row into the stream's memory.

Two groups: the one-event step (n=1) and a 64-row batch, I=16, H=64, 1 thread. Timings are
never asserted. ``python benchmarks/test_missing_overhead.py [rounds]`` alternates the
contenders in short rounds (the robust comparison on a shared machine) and prints the median
per-call times and per-round ratios to ``before``.
"""

import re
import statistics
import sys

import numpy as np
import pytest
from test_metrics_overhead import build_package, rotating_rounds

from streamgru.harness.bench import machine_info

POLICIES = ("refuse", "skip", "zero", "last")
# The clean path's missing-value statement in step(): "if store.last is not None:" and its body.
LAST_CHECK = re.compile(r"^( *)if store\.last is not None:.*\n\1    .*\n", re.M)


def strip_missing(source):
    """``engine.py`` source without the ``store.last`` checks of step's clean paths."""
    body = source[source.index("    def step("):source.index("    def _step_rows(")]
    stripped, count = LAST_CHECK.subn("", body)
    if count < 1:
        raise RuntimeError("expected the store.last check of step: update LAST_CHECK")
    return source.replace(body, stripped)


def make_engine(variant, n):
    """A warmed engine of ``variant`` with ``n`` streams, its keys and a clean input."""
    if variant == "before":
        pkg, policy = build_package("streamgru_nomissing", strip_missing), "refuse"
    else:
        pkg, policy = build_package("streamgru_metrics", None), variant
    engine = pkg.Engine(pkg.GRUModel.random(16, 64, seed=0), threads=1, missing=policy)
    x = np.random.default_rng(1).normal(size=(n, 16)).astype(np.float32)
    keys = list(range(n))
    for _ in range(100):  # open the streams, compile and warm up outside the timing
        engine.step(keys, x)
    return engine, keys, x


@pytest.mark.parametrize("n", [1, 64])
@pytest.mark.parametrize("variant", ("before",) + POLICIES)
def test_clean_step(benchmark, variant, n):
    engine, keys, x = make_engine(variant, n)
    benchmark.group = f"missing-value policies, clean step: n={n}, I=16 H=64, 1 thread"
    info = machine_info()
    benchmark.extra_info.update({k: info[k] for k in ("cpu", "cores", "numba", "numpy")})
    benchmark.extra_info.update(variant=variant, threads=1)
    y = benchmark(engine.step, keys, x)
    assert y.shape == (n, engine.model.output_size) and np.isfinite(y).all()


def interleaved(n, rounds=300, calls=300):
    """Alternate ``calls`` steps of each contender for ``rounds`` rotating rounds; returns the
    median us per call of each and the median per-round ratio of each to ``before``."""
    variants = ("before",) + POLICIES
    engines = [make_engine(v, n) for v in variants]
    per = rotating_rounds(engines, rounds, calls)
    med = statistics.median
    times = {v: med(p) for v, p in zip(variants, per)}
    ratios = {v: med(a / b for a, b in zip(p, per[0])) for v, p in zip(variants, per)}
    return times, ratios


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    for n in (1, 64):
        times, ratios = interleaved(n, rounds)
        print(f"clean step n={n}, I=16 H=64, 1 thread, {rounds} rotating rounds: " + ", ".join(
            f"{v} {times[v]:.3f} us ({(ratios[v] - 1) * 100:+.1f}%)" for v in times))
