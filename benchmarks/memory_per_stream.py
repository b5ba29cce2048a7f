"""Memory per stream: resident memory an Engine adds per open stream, by component.

Each measurement runs in a fresh process (resident memory is not given back reliably, and one
run's growth would hide the next's)::

    PYTHONPATH=$PWD python benchmarks/memory_per_stream.py                  # int and str keys,
                                                                            # 1M and 10M streams
    PYTHONPATH=$PWD python benchmarks/memory_per_stream.py --streams 1000000 --keys str --child

The child opens ``--streams`` streams of a one-layer GRU (``--hidden`` 64: 256 bytes of float32
state each) with ``Engine.step`` in batches of 65,536 keys, as a stream source would: int keys
are 1e9 + i (numpy int64 arrays), str keys ``"device-000123"`` (lists of str). It prints, per
stream: the resident memory added (``VmRSS``), the peak added during the fill (``VmHWM`` after
resetting it), and the store's own accounting by component (``StateStore.footprint``). Needs
Linux (``/proc/self``); 10M streams need ~4 GB of free memory.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

BATCH = 65_536


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    """Reset VmHWM to the current resident size (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(streams, keys, hidden, track):
    from streamgru import Engine, GRUModel

    model = GRUModel.random(4, [hidden], seed=0)
    eng = Engine(model, max_streams=10 * streams if track else None)
    one = np.zeros((1, 4), np.float32)
    warm = [np.int64(-1)] if keys == "int" else ["warm"]
    eng.step(np.array(warm) if keys == "int" else warm, one)  # compile (or load) the kernels
    eng.step(np.arange(-BATCH, 0) if keys == "int" else [f"w{i}" for i in range(BATCH)],
             np.zeros((BATCH, 4), np.float32))
    for k in eng.keys():
        eng.close(k)
    x = np.zeros((BATCH, 4), np.float32)
    rss0 = _status("VmRSS")
    _reset_peak()
    for start in range(0, streams, BATCH):
        stop = min(start + BATCH, streams)
        if keys == "int":
            ks = np.arange(start, stop, dtype=np.int64) + 1_000_000_000
        else:
            ks = [f"device-{i:06d}" for i in range(start, stop)]
        eng.step(ks, x[:stop - start])
    rss1, peak = _status("VmRSS"), _status("VmHWM")
    parts = eng._store.footprint()
    state_bytes = model.state_size * np.dtype(np.float32).itemsize
    print(json.dumps({
        "keys": keys, "streams": streams, "hidden": hidden, "track": track,
        "state_bytes": state_bytes,
        "rss_added_per_stream": (rss1 - rss0) / streams,
        "peak_added_per_stream": (peak - rss0) / streams,
        "parts_per_stream": {k: v / streams for k, v in parts.items()},
        "capacity": eng.capacity,
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, action="append")
    p.add_argument("--keys", choices=("int", "str"), action="append")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--track", action="store_true", help="with max_streams set (recency kept)")
    p.add_argument("--child", action="store_true", help="measure in this process (one run)")
    args = p.parse_args()
    if args.child:
        child(args.streams[0], args.keys[0], args.hidden, args.track)
        return
    rows = []
    for keys in args.keys or ["int", "str"]:
        for n in args.streams or [1_000_000, 10_000_000]:
            cmd = [sys.executable, __file__, "--child", "--streams", str(n), "--keys", keys,
                   "--hidden", str(args.hidden)] + (["--track"] if args.track else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(out.stdout.strip().splitlines()[-1], flush=True)
    print()
    print("| keys | streams | RSS added / stream | x state | peak added / stream | "
          "by component (bytes / stream) |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["parts_per_stream"].items())
        print(f"| {r['keys']} | {r['streams']:,} | {r['rss_added_per_stream']:.1f} B | "
              f"{r['rss_added_per_stream'] / r['state_bytes']:.2f} | "
              f"{r['peak_added_per_stream']:.1f} B | {parts} |")


if __name__ == "__main__":
    main()
