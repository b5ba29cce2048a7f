"""Step latency by key kind: the regimes the key map sits on, to compare two trees of streamgru.

    PYTHONPATH=$PWD python benchmarks/step_latency_keys.py                 # this tree
    PYTHONPATH=$PWD python benchmarks/step_latency_keys.py --against DIR   # and the streamgru
                                                                           # package under DIR
With ``--against``, fresh processes alternate between the two trees (``--rounds`` each), so a
shared machine's drift hits both alike; the table gives each regime's median over the rounds of
the per-process medians (microseconds per ``Engine.step`` call, one thread). Regimes:

* ``n=1 hot``: one event of the one open stream (I=16, H=64): the one-event fast path;
* ``n=1 of 1M``: one event of a random stream among 1,000,000 open ones (the key map and the
  state row are not in cache);
* ``n=4096 of 100k``: 4,096 distinct random streams among 100,000 (I=H=128), as the ``many``
  workload of ``streamgru bench``.

Each with int keys (a list for n=1, a numpy int64 array for n=4096) and str keys (lists).
``--lookups`` times only what the one-event path does to find an int key, before and now.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np


def _keys(kind, ids):
    if kind == "int":
        return ids + 1_000_000_000
    return np.array([f"device-{i:06d}" for i in ids.tolist()])


def child(seconds):
    import numba

    from streamgru import Engine, GRUModel
    from streamgru.harness.bench import time_calls

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    out = {}
    for kind in ("int", "str"):
        for name, I, H, streams, n in (("n=1 hot", 16, 64, 1, 1),
                                       ("n=1 of 1M", 16, 64, 1_000_000, 1),
                                       ("n=4096 of 100k", 128, 128, 100_000, 4096)):
            eng = Engine(GRUModel.random(I, [H], seed=0))
            every = _keys(kind, np.arange(streams))
            for s in range(0, streams, 65_536):
                part = every[s:s + 65_536]
                eng.step(part if kind == "int" else part.tolist(),
                         np.zeros((len(part), I), np.float32))
            calls = []
            for _ in range(256):
                ks = every[rng.choice(streams, n, replace=False)]
                ks = ks.tolist() if n == 1 or kind == "str" else ks
                calls.append((ks, rng.standard_normal((n, I)).astype(np.float32)))
            time_calls(eng.step, calls, 0.2)  # warm-up
            out[f"{name} {kind}"] = statistics.median(time_calls(eng.step, calls, seconds)) * 1e6
            del eng
    print(json.dumps(out))


def lookups(rounds):
    """ns per one-key lookup as the one-event path does it, int keys among 1,000,000 open: the
    previous index (a dict) against the store's (``hot`` dict, then the table), interleaved in
    one process so that a shared machine's noise hits both; min and median over ``rounds``."""
    import time

    from streamgru.state import StateStore

    n = 1_000_000
    keys = np.arange(n, dtype=np.int64) + 1_000_000_000
    st = StateStore(1, np.float32, 16)
    st.slots_array(keys)
    old = dict(zip(keys.tolist(), range(n)))
    rng = np.random.default_rng(0)
    cases = {"hot": [1_000_012_345] * 65_536,
             "random of 1M": (rng.integers(0, n, 65_536) + 1_000_000_000).tolist()}

    def new_get(k, store=st):
        slot = store.hot.get(k)
        if slot is None:
            slot = store.slot_of.get(k)
        return slot

    def old_get(k, get=old.get):
        return get(k)

    res = {}
    for _ in range(rounds):
        for case, ks in cases.items():
            for name, get in (("dict (before)", old_get), ("hot + table (now)", new_get)):
                t0 = time.perf_counter_ns()
                for k in ks:
                    get(k)
                res.setdefault(f"{case}: {name}", []).append((time.perf_counter_ns() - t0) / len(ks))
    for g, v in res.items():
        print(f"{g}: min {min(v):.0f} ns, median {statistics.median(v):.0f} ns")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--against", help="a directory holding another streamgru package")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--child", action="store_true")
    p.add_argument("--lookups", action="store_true",
                   help="instead: the one-key lookup alone, before against now (this tree)")
    args = p.parse_args()
    if args.lookups:
        lookups(max(args.rounds, 9))
        return
    if args.child:
        child(args.seconds)
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this": here} | ({"against": os.path.abspath(args.against)} if args.against else {})
    runs = {t: [] for t in trees}
    for r in range(args.rounds):
        for tree, path in trees.items():
            env = dict(os.environ, PYTHONPATH=path)
            res = subprocess.run([sys.executable, __file__, "--child", "--seconds",
                                  str(args.seconds)], env=env, check=True, capture_output=True,
                                 text=True)
            runs[tree].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(tree, r, runs[tree][-1], flush=True)
    regimes = list(runs["this"][0])
    print("\n| regime | " + " | ".join(f"{t} (us, median of {args.rounds})" for t in trees) +
          (" | this / against |" if len(trees) == 2 else " |"))
    print("|---|" + "---:|" * (len(trees) + (len(trees) == 2)))
    for g in regimes:
        med = [statistics.median(run[g] for run in runs[t]) for t in trees]
        ratio = f" {med[0] / med[1]:.3f} |" if len(med) == 2 else ""
        print(f"| {g} | " + " | ".join(f"{m:.2f}" for m in med) + " |" + ratio)


if __name__ == "__main__":
    main()
