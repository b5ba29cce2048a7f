"""Cold against warm start to a first step, repeated, for trees compared in alternation.

``streamgru info --timing`` measures one cold and one warm process, with the first batch and
run (a minute); this repeats the first step alone (a few seconds a round), the way the issue's
aim is stated: the cold process's time to a served first step (import and load included) over
the warm one's. Each round and tree: two fresh processes on a fresh ``NUMBA_CACHE_DIR``, the
first compiling, the second loading, the tree put first on ``PYTHONPATH``. The child is
``streamgru.harness.bench``'s start script of the tree this file is in (public API alone), so
any earlier tree can be compared::

    cd /tmp && python <tree>/benchmarks/cold_start.py --rounds 8 <before-tree> <after-tree>

``--model`` takes a model file (default: the shipped GRU model). Prints each round, then per
tree the medians and the ratios' range. Set ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` to
measure another ISA's build.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

# The start script of the tree this file is in, whatever streamgru is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from streamgru.harness.bench import _START_CHILD, _START_PHASES  # noqa: E402


def one_round(tree, model):
    """A cold then a warm process on a fresh cache, ``tree`` first on PYTHONPATH:
    {"cold": {phase: s}, "warm": {phase: s}}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (tree, os.environ.get("PYTHONPATH")) if p))
    out = {}
    with tempfile.TemporaryDirectory(prefix="streamgru-cold-") as cache:
        env["NUMBA_CACHE_DIR"] = cache
        for label in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", _START_CHILD, model, "0"], env=env,
                                 capture_output=True, text=True, timeout=900, check=True)
            out[label] = dict(zip(_START_PHASES, json.loads(res.stdout.strip().splitlines()[-1])))
    return out


def main(argv=None):
    from streamgru.harness.demo import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="+", help="source trees (each holding streamgru/)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    args = p.parse_args(argv)
    got = {t: [] for t in args.trees}
    for r in range(args.rounds):
        for tree in args.trees:
            t = one_round(tree, args.model)
            cold, warm = (t[k]["import+load"] + t[k]["first step"] for k in ("cold", "warm"))
            got[tree].append((t["cold"]["first step"], cold, warm))
            print(f"round {r + 1} {tree}: first step {t['cold']['first step']:.2f} s, to a "
                  f"served first step cold {cold:.2f} s, warm {warm:.2f} s: {cold / warm:.2f}x",
                  flush=True)
    for tree, rows in got.items():
        ratios = [c / w for _, c, w in rows]
        print(f"{tree}: median first step {statistics.median(s for s, _, _ in rows):.2f} s, "
              f"median warm {statistics.median(w for _, _, w in rows):.2f} s, cold/warm median "
              f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}, "
              f"{len(ratios)} rounds)")


if __name__ == "__main__":
    main()
