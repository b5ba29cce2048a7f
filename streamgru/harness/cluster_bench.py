"""The ``ShardedEngine`` benchmark: a Zipf event stream through local Engines and 1..N Ray shards.

``benchmarks/cluster_bench.py`` and ``streamgru bench --cluster`` call :func:`run_cluster_benchmark`.

The event stream: ``batches`` batches of ``batch`` events; keys drawn from a Zipf law of exponent
``zipf`` over ``keys`` keys (rank r has probability proportional to r**-zipf; ranks mapped to keys
by a random permutation so hot keys spread over the shards). With ``fill``, every key is opened
first (not timed), so the shards hold all ``keys`` streams. Contenders: a local Engine with 1 and 2
Numba threads (the same work without a Ray hop), then N shards: ``sync`` (one step at a time:
latency) and ``pipelined`` (``step_async``, ``depth`` batches in flight: throughput).

Where the time of a sync batch goes is measured from outside the engine: ``driver`` is the time
inside ``step_async`` (validation, placement, the split over shards, serialization and task
submission, all in the calling thread), ``wait`` the time inside ``StepFuture.result`` (Ray
transport, the actors' work, gathering the rows in input order); the time inside ``Engine.step``
in each actor comes from ``ShardedEngine.stats()`` (``engine_seconds``).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from ..cluster import ShardedEngine, start_local_ray
from ..model import GRUModel
from .bench import machine_info

__all__ = ["zipf_events", "run_cluster_benchmark", "format_table"]


def zipf_events(keys, n_events, exponent, seed):
    """int64 keys of ``n_events`` events, Zipf(``exponent``) over ``keys`` keys, seeded."""
    rng = np.random.default_rng(seed)
    w = np.arange(1, keys + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n_events)), keys - 1)
    return rng.permutation(keys).astype(np.int64)[ranks]


def _pct(a, q):
    return float(np.percentile(np.asarray(a), q)) if len(a) else float("nan")


def _fill(step, keys, input_size, dtype, chunk=16384):
    x = np.zeros((chunk, input_size), dtype)
    for lo in range(0, keys, chunk):
        k = np.arange(lo, min(keys, lo + chunk), dtype=np.int64)
        step(k, x[:len(k)])


class _Contender:
    """One engine under test: a local Engine (shards=None) or a ShardedEngine."""

    def __init__(self, name, eng, shards):
        self.name, self.eng, self.shards = name, eng, shards
        self.lat, self.sync_rate, self.pipe_rate = [], [], []
        self.timing = {"driver": 0.0, "wait": 0.0}
        self.busy = None
        self.n_sync = 0

    def sync(self, ks, xs):
        eng = self.eng
        if self.shards is None:
            t0 = time.perf_counter()
            for k, x in zip(ks, xs):
                t = time.perf_counter()
                eng.step(k, x)
                self.lat.append(time.perf_counter() - t)
            self.sync_rate.append(sum(len(k) for k in ks) / (time.perf_counter() - t0))
            return
        b_before = [s["engine_seconds"] for s in eng.stats()]
        t0 = time.perf_counter()
        for k, x in zip(ks, xs):
            t = time.perf_counter()
            fut = eng.step_async(k, x)  # what ShardedEngine.step does, timed in two parts
            t1 = time.perf_counter()
            fut.result()
            t2 = time.perf_counter()
            self.lat.append(t2 - t)
            self.timing["driver"] += t1 - t
            self.timing["wait"] += t2 - t1
        self.sync_rate.append(sum(len(k) for k in ks) / (time.perf_counter() - t0))
        self.n_sync += len(ks)
        busy = [s["engine_seconds"] - b for s, b in zip(eng.stats(), b_before)]
        self.busy = busy if self.busy is None else [a + b for a, b in zip(self.busy, busy)]

    def pipelined(self, ks, xs, depth):
        if self.shards is None:
            return
        pending = []
        t0 = time.perf_counter()
        for k, x in zip(ks, xs):
            pending.append(self.eng.step_async(k, x))
            if len(pending) >= depth:
                pending.pop(0).result()
        for f in pending:
            f.result()
        self.pipe_rate.append(sum(len(k) for k in ks) / (time.perf_counter() - t0))

    def result(self, depth):
        r = {"events_per_s": float(np.median(self.sync_rate)),
             "events_per_s_rounds": [round(v) for v in self.sync_rate],
             "p50_ms": _pct(self.lat, 50) * 1e3, "p99_ms": _pct(self.lat, 99) * 1e3}
        if self.shards is None:
            return r
        nb = max(self.n_sync, 1)
        tm = {k: v / nb * 1e3 for k, v in self.timing.items()}
        tm["engine_max_shard"] = max(self.busy) / nb * 1e3
        tm["engine_sum"] = sum(self.busy) / nb * 1e3
        r["per_batch_ms"] = tm
        return {"sync": r, "pipelined": {"events_per_s": float(np.median(self.pipe_rate)),
                                         "events_per_s_rounds": [round(v) for v in self.pipe_rate],
                                         "depth": depth}}


def run_cluster_benchmark(keys=1_000_000, batch=1024, batches=200, warmup=20, zipf=1.1,
                          input_size=16, hidden=128, outputs=8, shards=(1, 2), depth=4, rounds=5,
                          fill=True, seed=0, local=True, actor_options=None, out=print):
    """Step a Zipf event stream through local Engines and 1..N shards; print a table, return a dict.

    All contenders are built first, then run side by side: in each of ``rounds`` rounds every
    contender steps the same next slice of ``batches / rounds`` batches one at a time (sync),
    and the shards step a further slice with ``depth`` batches in flight (pipelined). Rates are
    the median over rounds, latencies pooled, so a change of machine load hits every contender
    alike.

    Parameters
    ----------
    keys : int
        Number of distinct stream keys (the Zipf law's support).
    batch, batches, warmup : int
        Events per batch, timed batches (per mode), untimed warm-up batches.
    zipf : float
        Exponent of the Zipf law (rank r has probability proportional to r**-zipf; ranks are
        mapped to keys by a seeded permutation, so hot keys spread over the shards).
    input_size, hidden, outputs : int
        The model: ``GRUModel.random(input_size, [hidden], dense_after=[(outputs, "identity")])``
        (no dense head if ``outputs`` is 0), float32. Each event's output row travels back to the
        driver, so large outputs cost Ray transfer time.
    shards : sequence of int
        Shard counts to run (each a ``ShardedEngine`` with one Numba thread per shard).
    depth : int
        Batches in flight in the pipelined runs.
    rounds : int
        Interleaved rounds (see above).
    fill : bool
        Open every key first (untimed), so the shards hold ``keys`` streams; then also time a
        ``save_state`` of them and read the actors' resident memory.
    local : bool
        Also run a local ``Engine`` (1 and 2 Numba threads) on the same batches: the same work
        without the Ray hop.
    actor_options : dict, optional
        Passed to ``ShardedEngine`` (default ``{"num_cpus": 0}``: all contenders exist at once).
    out : callable or None
        Receives the formatted table (default ``print``).

    Returns
    -------
    dict with ``config``, ``machine`` (CPU, load average, versions), ``local``, ``sharded`` (per
    shard count: ``sync`` events/s, p50/p99 ms and a per-batch time breakdown -- ``driver`` (in
    ``step_async``), ``wait`` (in ``result()``) and the time inside ``Engine.step`` in the
    actors (see the module docstring); ``pipelined`` events/s; streams, actor memory,
    checkpoint size and time) and
    ``derived`` (scaling efficiency 2 shards / (2 x 1 shard), Ray-hop cost).

    Starts a loopback-only local Ray (``start_local_ray``) if Ray is not initialized, and stops it
    at the end; an initialized Ray is used as it is.

    Examples
    --------
    >>> from streamgru.harness.cluster_bench import run_cluster_benchmark
    >>> r = run_cluster_benchmark(keys=1000, batch=64, batches=10, warmup=2, fill=False,
    ...                           out=None)                          # doctest: +SKIP
    >>> sorted(r["sharded"])                                         # doctest: +SKIP
    [1, 2]
    """
    from ..engine import Engine

    try:
        import ray
    except ImportError:
        raise ImportError("run_cluster_benchmark needs Ray: pip install 'streamgru[ray]'") from None

    rounds = max(1, min(rounds, batches))
    started = False
    if not ray.is_initialized():
        start_local_ray(num_cpus=max(2, max(shards)))
        started = True
    contenders = []
    try:
        model = GRUModel.random(input_size, [hidden], seed=seed,
                                dense_after=[(outputs, "identity")] if outputs else ())
        total = warmup + 2 * batches
        ev = zipf_events(keys, total * batch, zipf, seed)
        ks = [ev[i * batch:(i + 1) * batch] for i in range(total)]
        rng = np.random.default_rng(seed + 1)
        xs = [rng.standard_normal((batch, input_size), dtype=np.float32) for _ in range(total)]
        res = {
            "config": {"keys": keys, "batch": batch, "batches": batches, "warmup": warmup,
                       "zipf": zipf, "input_size": input_size, "hidden": hidden, "outputs": outputs,
                       "state_size": model.state_size, "depth": depth, "rounds": rounds,
                       "fill": fill, "seed": seed,
                       "distinct_keys_in_timed_events": int(np.unique(ev[warmup * batch:]).size)},
            "machine": _machine(),
            "local": {},
            "sharded": {},
        }
        extra = {}
        if local:
            for th in (1, 2):
                eng = Engine(model, threads=th, capacity=keys if fill else 1024)
                if fill:
                    _fill(eng.step, keys, input_size, np.float32)
                contenders.append(_Contender(f"{th}t", eng, None))
        opts = {"num_cpus": 0} if actor_options is None else actor_options
        for n in shards:
            eng = ShardedEngine(model, shards=n, threads_per_shard=1, actor_options=opts,
                                capacity=int(keys / n * 1.1) + 16 if fill else 1024)
            contenders.append(_Contender(n, eng, n))
            if fill:
                t = time.perf_counter()
                _fill(eng.step, keys, input_size, np.float32)
                extra[n] = {"fill_s": time.perf_counter() - t}
        for c in contenders:
            for i in range(warmup):
                c.eng.step(ks[i], xs[i])
        bounds = np.linspace(0, batches, rounds + 1).astype(int)
        for r in range(rounds):
            lo, hi = warmup + bounds[r], warmup + bounds[r + 1]
            for c in contenders:
                c.sync(ks[lo:hi], xs[lo:hi])
                c.pipelined(ks[batches + lo:batches + hi], xs[batches + lo:batches + hi], depth)
        for c in contenders:
            if c.shards is None:
                res["local"][c.name] = c.result(depth)
                continue
            r = c.result(depth)
            st = c.eng.stats()
            r.update(streams=len(c.eng), rows_per_shard=[s["rows"] for s in st],
                     rss_bytes_per_shard=[s["rss_bytes"] for s in st], **extra.get(c.shards, {}))
            if fill:
                with tempfile.TemporaryDirectory(prefix="sgru-ckpt-") as d:
                    t = time.perf_counter()
                    m = c.eng.save_state(d)
                    r["checkpoint_s"] = time.perf_counter() - t
                    r["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(d, e["file"]))
                                                for e in m["files"])
                r["rss_bytes_per_shard_after_save"] = [s["rss_bytes"] for s in c.eng.stats()]
            res["sharded"][c.shards] = r
        _derive(res, contenders)
        res["machine"]["loadavg_after"] = _loadavg()
        if out is not None:
            out(format_table(res))
        return res
    finally:
        for c in contenders:
            if c.shards is not None:
                c.eng.shutdown()
        if started:
            ray.shutdown()


def _derive(res, contenders):
    sh = res["sharded"]
    d = {}
    by = {c.shards: c for c in contenders if c.shards is not None}
    if 1 in by and 2 in by:  # per round, side by side, then the median
        for mode, attr in (("pipelined", "pipe_rate"), ("sync", "sync_rate")):
            eff = [b / (2 * a) for a, b in zip(getattr(by[1], attr), getattr(by[2], attr))]
            d[f"scaling_efficiency_{mode}"] = float(np.median(eff))
    loc = next((c for c in contenders if c.name == "1t"), None)
    if loc is not None and 1 in sh:
        d["ray_hop_ms_p50"] = sh[1]["sync"]["p50_ms"] - res["local"]["1t"]["p50_ms"]
        d["local_1t_over_1_shard_sync"] = float(np.median(
            [a / b for a, b in zip(loc.sync_rate, by[1].sync_rate)]))
        d["local_1t_over_1_shard_pipelined"] = float(np.median(
            [a / b for a, b in zip(loc.sync_rate, by[1].pipe_rate)]))
    res["derived"] = d


def _loadavg():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def _machine():
    """:func:`streamgru.harness.bench.machine_info` plus what a cluster run adds: Ray's version,
    the platform and the load average before the run."""
    import platform

    info = machine_info()
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    info["platform"] = platform.platform()
    info["loadavg_before"] = _loadavg()
    return info


def format_table(res):
    """The results of :func:`run_cluster_benchmark` as a text table."""
    c, m = res["config"], res["machine"]
    la = m.get("loadavg_before")
    lines = [f"Zipf({c['zipf']}) events over {c['keys']:,} keys, batches of {c['batch']}, "
             f"{c['batches']} timed batches per mode in {c['rounds']} interleaved rounds "
             f"({c['distinct_keys_in_timed_events']:,} distinct keys), I={c['input_size']} "
             f"H={c['hidden']} outputs={c['outputs']} float32, fill={c['fill']}; {m['cores']} cores, "
             f"load average {la[0]:.1f} before, {m['loadavg_after'][0]:.1f} after" if la else "",
             f"{'contender':<24}{'events/s':>12}{'p50 ms':>9}{'p99 ms':>9}"]
    for name, r in res["local"].items():
        lines.append(f"{'local Engine ' + name:<24}{r['events_per_s']:>12,.0f}{r['p50_ms']:>9.2f}"
                     f"{r['p99_ms']:>9.2f}")
    for n, r in res["sharded"].items():
        s = r["sync"]
        lines.append(f"{f'{n} shard(s), sync':<24}{s['events_per_s']:>12,.0f}{s['p50_ms']:>9.2f}"
                     f"{s['p99_ms']:>9.2f}")
        p = r["pipelined"]
        label = f"{n} shard(s), {p['depth']} in flight"
        lines.append(f"{label:<24}{p['events_per_s']:>12,.0f}")
    lines.append("where the time goes, per sync batch (ms): driver (in step_async) / wait (in "
                 "result()) | inside Engine.step (slowest shard, sum of shards)")
    for n, r in res["sharded"].items():
        t = r["sync"]["per_batch_ms"]
        lines.append(f"  {n} shard(s): {t['driver']:.3f} / {t['wait']:.3f} | "
                     f"{t['engine_max_shard']:.3f}, {t['engine_sum']:.3f}")
    for n, r in res["sharded"].items():
        if r.get("checkpoint_s") is not None:
            rss = "+".join(f"{b / 1e6:.0f}" for b in r["rss_bytes_per_shard"] if b)
            lines.append(f"  {n} shard(s): {r['streams']:,} streams, actor RSS {rss} MB; save_state "
                         f"{r['checkpoint_s']:.2f} s for {r['checkpoint_bytes'] / 1e6:.0f} MB; fill "
                         f"{r['fill_s']:.1f} s")
    for k, v in res.get("derived", {}).items():
        lines.append(f"{k}: {v:.3f}")
    return "\n".join(lines)
