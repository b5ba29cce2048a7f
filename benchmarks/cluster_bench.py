"""ShardedEngine benchmark: a Zipf event stream over 1,000,000 keys through 1 and 2 Ray shards.

Run (a few minutes with the defaults; needs the ``ray`` extra)::

    .venv/bin/python benchmarks/cluster_bench.py --json /tmp/cluster.json
    .venv/bin/python benchmarks/cluster_bench.py --keys 10000 --batches 20 --no-fill   # a quick look

The workload, the contenders (local ``Engine`` 1 and 2 threads; 1 and 2 shards, sync and
pipelined) and the time breakdown are described at ``streamgru.harness.cluster_bench.run_cluster_benchmark``,
which does the work (``streamgru bench --cluster`` calls it too). Ray runs locally, over
127.0.0.1 only. Results and the command that produced them go in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from streamgru.harness.cluster_bench import run_cluster_benchmark  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description="ShardedEngine benchmark (Zipf events, 1 and 2 shards)")
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--input-size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--outputs", type=int, default=8, help="width of the dense head (0: none)")
    ap.add_argument("--shards", default="1,2", help="comma-separated shard counts (default 1,2)")
    ap.add_argument("--depth", type=int, default=4, help="batches in flight in the pipelined run")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (contenders side by side)")
    ap.add_argument("--no-fill", action="store_true", help="do not open every key first")
    ap.add_argument("--no-local", action="store_true", help="skip the local Engine baselines")
    ap.add_argument("--json", help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    res = run_cluster_benchmark(
        keys=a.keys, batch=a.batch, batches=a.batches, warmup=a.warmup, zipf=a.zipf,
        input_size=a.input_size, hidden=a.hidden, outputs=a.outputs,
        shards=tuple(int(s) for s in a.shards.split(",")), depth=a.depth, rounds=a.rounds,
        fill=not a.no_fill, local=not a.no_local)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
