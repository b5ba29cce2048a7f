"""Prometheus exposition of :meth:`Engine.stats` (optional extra: ``pip install streamgru[metrics]``).

Nothing here runs in the hot path: the verbs only bump integers on the engine (see
``Engine.stats``); a :func:`collector` reads ``stats()`` when Prometheus scrapes and turns it into
metric families. ``prometheus_client`` is imported when a collector is built, never at import
time. Every series is listed, with recommended alerts, in docs/operations.md.

Examples
--------
Serve an embedding application's engine on http://127.0.0.1:9464/metrics::

    from streamgru.metrics import serve
    server = serve(engine, 9464)      # port 0 picks a free port: server.port
    ...
    server.close()

Or add the engine to a registry the application already exposes::

    from prometheus_client import REGISTRY
    from streamgru.metrics import collector
    REGISTRY.register(collector(engine))
"""

from __future__ import annotations

__all__ = ["MetricsServer", "collector", "engine_families", "require_prometheus", "serve"]

PREFIX = "streamgru_"


def require_prometheus():
    """The ``prometheus_client`` module, or an ImportError saying how to install it."""
    try:
        import prometheus_client
    except ImportError:
        raise ImportError("streamgru.metrics: expected the prometheus_client package, got none "
                          "installed; install it with pip install 'streamgru[metrics]'") from None
    return prometheus_client


def _check_engine(engine):
    from .cluster import ShardedEngine
    from .engine import Engine

    if not isinstance(engine, (Engine, ShardedEngine)):
        raise TypeError(f"engine: expected a streamgru.Engine or streamgru.cluster.ShardedEngine, "
                        f"got {type(engine).__name__}")


def collector(engine):
    """A Prometheus collector that reads ``engine.stats()`` at each scrape.

    Parameters
    ----------
    engine : Engine or ShardedEngine
        A ``ShardedEngine``'s series carry a ``shard`` label, one set per shard.

    Returns
    -------
    prometheus_client.registry.Collector
        Register it with ``registry.register(...)``.
    """
    _check_engine(engine)
    prom = require_prometheus()
    from prometheus_client.registry import Collector

    class EngineCollector(Collector):
        def collect(self):
            return engine_families(engine, prom)

        def describe(self):
            return []  # no scrape when registered: the series are known only from stats()

    return EngineCollector()


def engine_families(engine, prom=None):
    """The metric families of one scrape of ``engine`` (see docs/operations.md)."""
    from .engine import Engine

    prom = prom or require_prometheus()
    if isinstance(engine, Engine):
        parts = [((), (), engine.stats())]
    else:
        parts = [(("shard",), (str(i),), s["engine"]) for i, s in enumerate(engine.stats())]
    from prometheus_client import core
    fams = {}

    def fam(kind, name, doc, labels):
        key = (kind, name)
        if key not in fams:
            fams[key] = kind(PREFIX + name, doc, labels=labels)
        return fams[key]

    for lnames, lvals, st in parts:
        calls = fam(core.CounterMetricFamily, "calls", "Engine verb calls started, refused ones "
                    "included.", list(lnames) + ["verb"])
        for verb, n in st["calls"].items():
            calls.add_metric(list(lvals) + [verb], n)
        rows = fam(core.CounterMetricFamily, "rows", "Rows (events) of step calls, and steps of "
                   "run calls, that returned (rows held under missing='skip' included; "
                   "streamgru_missing_rows_total counts those).", list(lnames) + ["verb"])
        refused = fam(core.CounterMetricFamily, "rows_refused", "Rows of calls refused because "
                      "of non-finite input or a step that would overflow (nothing changed).",
                      list(lnames) + ["verb"])
        per_call = fam(core.HistogramMetricFamily, "rows_per_call", "Rows per step call, steps "
                       "per run call.", list(lnames) + ["verb"])
        seconds = fam(core.HistogramMetricFamily, "call_duration_seconds", "Wall time inside "
                      "step and run calls that returned; step calls: a systematic sample, one "
                      "call in 32 (STEP_TIMING_EVERY).", list(lnames) + ["verb"])
        for verb in ("step", "run"):
            lv = list(lvals) + [verb]
            rows.add_metric(lv, st["rows"][verb])
            refused.add_metric(lv, st["rows_refused"][verb])
            per_call.add_metric(lv, *_buckets(st["rows_per_call"][verb]))
            seconds.add_metric(lv, *_buckets(st["call_seconds"][verb]))
        streams = st["streams"]
        fam(core.GaugeMetricFamily, "open_streams", "Streams open now.",
            list(lnames)).add_metric(list(lvals), streams["open"])
        fam(core.CounterMetricFamily, "streams_opened", "Streams opened (by step, run, open, "
            "set_state) or loaded by load_state.", list(lnames)).add_metric(
                list(lvals), streams["opened"])
        fam(core.CounterMetricFamily, "streams_closed", "Streams closed by close() or replaced "
            "by load_state.", list(lnames)).add_metric(list(lvals), streams["closed"])
        ev = fam(core.CounterMetricFamily, "streams_evicted", "Streams evicted, by reason: idle "
                 "(idle_timeout) or capacity (max_streams).", list(lnames) + ["reason"])
        for reason, n in streams["evicted"].items():
            ev.add_metric(list(lvals) + [reason], n)
        miss = st["missing"]
        fam(core.CounterMetricFamily, "missing_values", "NaN input values handled by the "
            "missing-value policy (Engine(missing=...)), in calls that returned.",
            list(lnames) + ["policy"]).add_metric(list(lvals) + [miss["policy"]], miss["values"])
        fam(core.CounterMetricFamily, "missing_rows", "Rows (run steps) holding NaN input values "
            "handled by the missing-value policy, in calls that returned.",
            list(lnames) + ["policy"]).add_metric(list(lvals) + [miss["policy"]], miss["rows"])
        snap = st["snapshots"]
        fam(core.CounterMetricFamily, "snapshots_written", "State snapshots written by "
            "save_state.", list(lnames)).add_metric(list(lvals), snap["written"])
        fam(core.CounterMetricFamily, "snapshot_written_bytes", "Bytes of the snapshots "
            "written.", list(lnames)).add_metric(list(lvals), snap["bytes"])
        fam(core.CounterMetricFamily, "snapshot_write_seconds", "Seconds spent writing "
            "snapshots.", list(lnames)).add_metric(list(lvals), snap["seconds"])
    return list(fams.values())


def _buckets(hist):
    """``(buckets, sum)`` for HistogramMetricFamily.add_metric: cumulative counts per bound."""
    out, total = [], 0
    for bound, count in zip(hist["bounds"], hist["counts"]):
        total += count
        out.append((repr(float(bound)), total))
    out.append(("+Inf", total + hist["counts"][-1]))
    return out, hist["sum"]


class MetricsServer:
    """A running ``/metrics`` endpoint (from :func:`serve`): ``host``, ``port`` (the bound one,
    also when 0 was asked for) and ``url``; ``close()`` stops it."""

    def __init__(self, httpd, thread, host):
        self._httpd, self._thread = httpd, thread
        self.host = host
        self.port = httpd.server_address[1]
        self.url = f"http://{host}:{self.port}/metrics"

    def close(self):
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve(engine, port, host="127.0.0.1", collectors=()):
    """Serve ``engine``'s series on ``http://host:port/metrics`` from a daemon thread.

    Parameters
    ----------
    engine : Engine or ShardedEngine
    port : int
        0 to 65535; 0 binds a free port (read it from the result's ``port``).
    host : str
        Address to bind: the loopback interface unless told otherwise (the series name no
        secrets, but a scrape costs the engine's lock for a moment).
    collectors : iterable of prometheus_client collectors
        More series to serve on the same endpoint (e.g. an application's own).

    Returns
    -------
    MetricsServer
    """
    _check_engine(engine)
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port: expected an int from 0 to 65535, got {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port: expected an int from 0 to 65535, got {port}")
    if not isinstance(host, str) or not host:
        raise TypeError(f"host: expected an address to bind as a non-empty str, got {host!r}")
    prom = require_prometheus()
    registry = prom.CollectorRegistry(auto_describe=False)
    registry.register(collector(engine))
    for c in collectors:
        registry.register(c)
    try:
        httpd, thread = prom.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"port: expected a port free to bind on {host}, got {port} "
                      f"({exc.strerror or exc})") from None
    return MetricsServer(httpd, thread, host)
