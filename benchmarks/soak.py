"""Soak run: many stream-steps over keys that come and go; memory must stay flat, speed must hold.

    python benchmarks/soak.py --steps 1000000 --keys 100000

A pool of ``--active`` live sessions is stepped in batches of mixed sizes (1 to 64 rows; with
``--threads 2`` the 64-row batches take the parallel kernel), with an occasional ``run`` of a
short sequence, ``reset`` and ``save_state``. Every session has a random length (geometric, mean
steps/keys, so that at least ``--keys`` distinct keys are opened); when it ends, the session is
either closed explicitly or abandoned, left for the engine to evict (``idle_timeout`` on a virtual
clock that ticks once per stream-step, and ``max_streams``, smaller than the live + abandoned
population, so both eviction paths run). Evicted states go to an ``on_evict`` that only counts
them.

Every ``--window`` stream-steps the script samples resident memory (``/proc/self/statm``) and the
window's throughput. After a warm-up (the first 10 % of steps) it checks:

* memory: every later sample within +10 % of the sample at the end of warm-up;
* speed: the median steps/s of the last third of the windows at least 85 % of the first third's
  (a shared 2-core machine is noisy: 15 % is the noise allowance, a leak-driven decay is not);
* bookkeeping: every key ever stepped is open, closed by the caller or was handed to ``on_evict``
  (nothing lost silently), and the engine's buffer never exceeds ``max_streams`` rows.

Exit status 0 when all hold. ``--json PATH`` writes the numbers. ``run_soak`` is importable (a
reduced run is part of the test suite, without the timing check).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter

import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from streamgru import Engine, GRUModel  # noqa: E402

BATCH_SIZES = np.array([1, 1, 1, 2, 4, 8, 16, 64])


def rss_bytes():
    """Current resident set size (Linux), or the peak (elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_soak(steps=1_000_000, keys=100_000, active=2_000, max_streams=4_000, idle_ticks=50_000,
             input_size=16, hidden=32, seed=0, window=20_000, save_every=200_000, threads=1,
             log=None):
    """Run the soak; return a dict of counts, samples and the engine (for inspection)."""
    rng = np.random.default_rng(seed)
    model = GRUModel.random(input_size, hidden, dense_after=[(4, "softmax")], seed=seed)
    ticks = [0]
    evicted = [0]
    open_keys = set()

    def on_evict(key, state):
        evicted[0] += 1
        open_keys.discard(key)

    eng = Engine(model, max_streams=max_streams, idle_timeout=idle_ticks, on_evict=on_evict,
                 clock=lambda: float(ticks[0]), capacity=256, threads=threads)
    mean_len = max(1.0, 0.9 * steps / keys)
    next_id = 0
    pool, budget = [], []
    for _ in range(active):
        pool.append(f"user-{next_id}")
        budget.append(int(rng.geometric(1.0 / mean_len)))
        next_id += 1
    xs = rng.normal(size=(4096, input_size)).astype(np.float32)
    snap = os.path.join(tempfile.mkdtemp(prefix="soak-"), "state.sgru")
    closed = abandoned = calls = runs = resets = saves = peak = 0
    done = 0
    samples = []  # (steps done, rss bytes, steps/s of the window)
    t_window, next_sample, next_save = time.perf_counter(), window, save_every
    while done < steps:
        r = rng.random()
        if r < 0.02:  # a short sequence for one session
            i = int(rng.integers(len(pool)))
            T = int(rng.integers(2, 40))
            eng.run(pool[i], xs[:T])
            chosen = [i]
            advance = T
            runs += 1
        else:
            n = int(BATCH_SIZES[rng.integers(len(BATCH_SIZES))])
            chosen = rng.integers(0, len(pool), n).tolist()
            off = int(rng.integers(0, len(xs) - n))
            eng.step([pool[i] for i in chosen], xs[off:off + n])
            advance = n
        calls += 1
        peak = max(peak, len(eng))
        open_keys.update(pool[i] for i in chosen)
        used = {chosen[0]: advance} if len(chosen) == 1 else Counter(chosen)
        for i, k in used.items():
            budget[i] -= k
            if budget[i] <= 0:  # the session ends: closed, or abandoned to eviction
                key = pool[i]
                if rng.random() < 0.5:
                    if key in eng:  # (an LRU eviction may have taken it already)
                        eng.close(key)
                        open_keys.discard(key)
                        closed += 1
                else:
                    abandoned += 1
                pool[i] = f"user-{next_id}"
                budget[i] = int(rng.geometric(1.0 / mean_len))
                next_id += 1
        if rng.random() < 0.002:
            key = pool[int(rng.integers(len(pool)))]
            if key in eng:
                eng.reset(key)
                resets += 1
        done += advance
        ticks[0] = done
        if done >= next_save:
            eng.save_state(snap)
            saves += 1
            next_save += save_every
        if done >= next_sample:
            now = time.perf_counter()
            samples.append((done, rss_bytes(), window / (now - t_window)))
            if log:
                log(f"{done:>10,} steps  rss {samples[-1][1] / 2**20:8.1f} MiB  "
                    f"{samples[-1][2]:>10,.0f} steps/s  streams {len(eng):>6}  "
                    f"capacity {eng.capacity}")
            t_window = time.perf_counter()
            next_sample += window
    if os.path.exists(snap):
        os.unlink(snap)
    os.rmdir(os.path.dirname(snap))
    return {
        "steps": done, "calls": calls, "runs": runs, "resets": resets, "saves": saves,
        "keys_opened": next_id, "closed": closed, "abandoned": abandoned, "evicted": evicted[0],
        "open_at_end": len(eng), "peak_streams": peak, "capacity": eng.capacity, "max_streams": max_streams,
        "lost": sorted(open_keys ^ set(eng.keys()))[:10], "samples": samples, "engine": eng,
    }


def judge(result, warmup_fraction=0.1, mem_tol=0.10, speed_floor=0.85):
    """The pass/fail checks described in the module docstring; returns (ok, lines)."""
    samples = result["samples"]
    warm = max(1, int(round(len(samples) * warmup_fraction)))
    base = samples[warm - 1][1]
    after = samples[warm:]
    peak = max((s[1] for s in after), default=base)
    third = max(1, len(after) // 3)
    first = float(np.median([s[2] for s in after[:third]])) if after else float("nan")
    last = float(np.median([s[2] for s in after[-third:]])) if after else float("nan")
    checks = [
        (peak <= base * (1 + mem_tol),
         f"memory: peak after warm-up {peak / 2**20:.1f} MiB vs {base / 2**20:.1f} MiB at the end of "
         f"warm-up ({(peak / base - 1) * 100:+.1f} %, limit +{mem_tol * 100:.0f} %)"),
        (last >= speed_floor * first,
         f"speed: median {first:,.0f} steps/s in the first third after warm-up, {last:,.0f} in the "
         f"last third (ratio {last / first:.3f}, floor {speed_floor})"),
        (not result["lost"], f"bookkeeping: keys neither open, closed nor evicted: {result['lost']}"),
        (result["capacity"] <= result["max_streams"],
         f"buffer: capacity {result['capacity']} rows, max_streams {result['max_streams']}"),
    ]
    return all(ok for ok, _ in checks), [("PASS " if ok else "FAIL ") + text for ok, text in checks]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1_000_000, help="stream-steps in total")
    ap.add_argument("--keys", type=int, default=100_000, help="distinct keys to open, at least")
    ap.add_argument("--active", type=int, default=2_000, help="live sessions at any time")
    ap.add_argument("--max-streams", type=int, default=4_000)
    ap.add_argument("--idle-ticks", type=int, default=50_000,
                    help="idle_timeout, in stream-steps of the virtual clock")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--window", type=int, default=None, help="stream-steps per sample (steps/50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="Engine(threads=...): 1 keeps Numba's parallel region out of the timing, "
                         "whose cost swings with the machine's load; 2 exercises it too")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    window = args.window or max(1, args.steps // 50)
    t0 = time.perf_counter()
    result = run_soak(steps=args.steps, keys=args.keys, active=args.active,
                      max_streams=args.max_streams, idle_ticks=args.idle_ticks, hidden=args.hidden,
                      seed=args.seed, window=window, threads=args.threads, log=print)
    wall = time.perf_counter() - t0
    ok, lines = judge(result)
    counts = {k: v for k, v in result.items() if k not in ("samples", "engine", "lost")}
    print(f"\n{counts}\nwall {wall:.1f} s, {result['steps'] / wall:,.0f} steps/s overall; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    for line in lines:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall_s": wall, "ok": ok, "checks": lines, **counts,
                       "samples": result["samples"]}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
