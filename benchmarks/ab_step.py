"""A against B on one many-stream workload: the step time of two or more trees, compared with
several processes per tree, interleaved.

On a shared 2-core host a process's own layout (where its arrays land, its huge pages) moves a
4096-row step by 2-5%, and the host's load drifts by more between runs. One process per tree,
or runs one after the other, then cannot tell a 2% change from noise: measured on a Zen 4 guest,
the same code in two processes differed by 3%. This starts ``--procs`` worker
processes per tree (each opens the streams and warms up once), then asks them in turn, in
alternating order, for ``--reps`` timed steps each, for ``--rounds`` rounds. It prints each
process's median over its rounds and per tree the median of those, and the ratio to the first
tree::

    cd /tmp && python <tree>/benchmarks/ab_step.py <before-tree> <after-tree> \\
        --cell lstm --hidden 128 --threads 1

A tree may be given as ``PATH:VAR=VALUE[,VAR=VALUE]`` to set environment variables for its
workers (a throwaway switch read at import, say); each tree gets a Numba cache directory of
its own under ``--cache`` (default: a temporary directory, compiled on first use), named from
the whole spec: Numba keys its cache by the source, not by what a switch read at import. Set
``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` to measure another ISA's build. The workers use
the public API and the bench harness's workloads (``streamgru.harness.bench``) of their own
tree.
"""

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile

WORKER = """
import sys, time
import numpy as np
from streamgru import Engine
from streamgru.harness.bench import batches, make_model, workload
cell, I, H, n, streams, threads = sys.argv[1], *map(int, sys.argv[2:7])
wl = workload(I, H, n, streams=streams if streams > n else 0, cell=cell)
model = make_model(wl)
engine = Engine(model, threads=threads)
zero = np.zeros(model.state_size, np.float32)
for k in range(max(streams, n)):
    engine.open(k, zero)
calls = batches(wl, 8)
for keys, x in calls[:3]:
    engine.step(keys, x)
print("ready", flush=True)
j = 0
for line in sys.stdin:
    ts = []
    for _ in range(int(line)):
        keys, x = calls[j % len(calls)]
        j += 1
        t0 = time.perf_counter()
        engine.step(keys, x)
        ts.append(time.perf_counter() - t0)
    print(float(np.median(ts)), min(ts), flush=True)
"""


def parse_tree(spec):
    """``PATH[:VAR=VALUE,...]`` -> (path, {VAR: VALUE})."""
    path, _, extra = spec.partition(":")
    env = {}
    for item in filter(None, extra.split(",")):
        var, eq, value = item.partition("=")
        if not eq or not var:
            raise ValueError(f"tree {spec!r}: expected PATH:VAR=VALUE[,VAR=VALUE], got {item!r}")
        env[var] = value
    if not os.path.isdir(os.path.join(path, "streamgru")):
        raise ValueError(f"tree {spec!r}: expected a directory holding streamgru/, got {path!r}")
    return path, env


def positive(name):
    """An argparse type: an int >= 1, refused as ``--name: expected ..., got ...``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < 1:
            raise argparse.ArgumentTypeError(f"--{name}: expected a positive int, got {text!r}")
        return value
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="+", help="source trees, PATH[:VAR=VALUE,...]")
    p.add_argument("--cell", default="gru", choices=("gru", "lstm"))
    p.add_argument("--input", type=positive("input"), default=None,
                   help="input size (default: the hidden size)")
    p.add_argument("--hidden", type=positive("hidden"), default=128)
    p.add_argument("--rows", type=positive("rows"), default=4096, help="events per call")
    p.add_argument("--streams", type=positive("streams"), default=100_000, help="open streams")
    p.add_argument("--threads", type=positive("threads"), default=1)
    p.add_argument("--procs", type=positive("procs"), default=4,
                   help="worker processes per tree")
    p.add_argument("--rounds", type=positive("rounds"), default=12)
    p.add_argument("--reps", type=positive("reps"), default=10,
                   help="timed steps per worker and round")
    p.add_argument("--stat", default="median", choices=("median", "min"),
                   help="of each round's steps (min: less moved by other tenants' bursts)")
    p.add_argument("--cache", default="", help="parent of the trees' Numba cache directories")
    args = p.parse_args(argv)
    try:
        trees = [parse_tree(t) for t in args.trees]
    except ValueError as exc:
        p.error(str(exc))
    cache_root = args.cache or tempfile.mkdtemp(prefix="streamgru-ab-")
    wargs = [args.cell, str(args.input or args.hidden), str(args.hidden), str(args.rows),
             str(args.streams), str(args.threads)]
    workers = []  # (tree index, process)
    try:
        for i, (path, extra) in enumerate(trees):
            # One cache per tree spec, never per position: Numba keys its cache by the source,
            # not by globals read at import, so two switch settings must not share one.
            tag = hashlib.sha1(args.trees[i].encode()).hexdigest()[:12]
            env = dict(os.environ, PYTHONPATH=path, **extra,
                       NUMBA_CACHE_DIR=os.path.join(cache_root, tag))
            for _ in range(args.procs):
                w = subprocess.Popen([sys.executable, "-c", WORKER, *wargs], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                if w.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"a worker of {args.trees[i]} did not start")
                workers.append((i, w))
        got = {id(w): [] for _, w in workers}
        for r in range(args.rounds):
            for _, w in workers if r % 2 == 0 else workers[::-1]:
                w.stdin.write(f"{args.reps}\n")
                w.stdin.flush()
                med, low = map(float, w.stdout.readline().split())
                got[id(w)].append(low if args.stat == "min" else med)
    finally:
        for _, w in workers:
            w.stdin.close()
            w.wait()
    base = None
    print(f"{args.cell} I={args.input or args.hidden} H={args.hidden} n={args.rows}/"
          f"{args.streams}, {args.threads} thread(s); ms per step, median of each process's "
          f"{args.rounds} rounds' {args.stat} of {args.reps} steps")
    for i, spec in enumerate(args.trees):
        per = [statistics.median(got[id(w)]) * 1e3 for j, w in workers if j == i]
        med = statistics.median(per)
        base = base or med
        print(f"{spec}: " + " ".join(f"{v:.3f}" for v in per) + f"  median {med:.3f} ms, "
              f"{med / base:.3f}x the first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
