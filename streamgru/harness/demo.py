"""``streamgru demo``: thousands of simulated smart watches through one engine, against onnxruntime.

The workload
------------
The default model (``streamgru/data/basic_motions_gru.sgru``, made by
``examples/train_default_model.py``) classifies a smart watch's activity (Standing, Running,
Walking, Badminton) at every 10 Hz sample of its 3-D accelerometer and gyroscope;
``streamgru demo --model lstm`` runs the LSTM classifier trained the same way
(``basic_motions_lstm.sgru``, converted from ``basic_motions_lstm.safetensors``: see
docs/default-model.md) through the same replay, the same checks and the same policies. The demo
simulates ``streams`` devices; device ``d`` replays held-out recording ``d % 40`` (100 steps)
from its first sample, starting at a random tick in ``[0, 100)``, so at any moment the devices
are at different points of their recordings. Events are ordered by tick, devices shuffled
within a tick, and cut into micro-batches of ``batch`` events, as a broker would deliver them;
a device may appear twice in one micro-batch when the batch spans two ticks.

Each micro-batch is one call of ``Engine.step(keys, x)``, timed alone. When onnxruntime is
installed the same events go through an ONNX model made from the same weights (ONNX ``GRU`` or
``LSTM``, ``MatMul``, ``Add``, ``Softmax``) with the states kept where a user would keep them: a
key -> slot dict and one ``(streams, state_size)`` array (``streamgru bench``'s
:class:`~streamgru.harness.bench.OrtContender`); every micro-batch gathers its streams' states,
runs, and scatters the new states back (a device listed twice in a batch is run in two waves, since
one ORT call steps every row from the same old state). That user-side work is inside the timing.

The accuracy is read at each device's last step; every device replaying the same recording
must agree, and the accuracy over the 40 recordings must equal the PyTorch model's, recorded at
training time in ``basic_motions_gru.json`` (``basic_motions_lstm.json``); tests/test_demo.py
checks it against torch itself.

Missing values: the demo then drops ``missing_rate`` (10%) of the held-out sensor values at
random (each channel at each tick independently, seeded: :func:`drop_readings`) and replays the
40 recordings again, one device each, in micro-batches of ``batch`` events, once per policy
(``Engine(model, missing="skip"|"zero"|"last")``). The accuracy at sequence end under each
policy is printed next to the clean one. These numbers are the engine's own outputs;
tests/test_demo.py checks them against PyTorch applying the same rule to the same inputs.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..formats import load
from ..isa import TILE
from ..model import GRUModel

__all__ = ["DATA_DIR", "DEFAULT_MODEL", "SHIPPED", "DefaultData", "DemoResult", "drop_readings",
           "load_default", "make_workload", "missing_accuracy", "replay_with_missing", "run_demo"]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # streamgru/data: package data
#: The shipped BasicMotions classifiers by name (``streamgru demo --model NAME``): the model file
#: and its training record in DATA_DIR. The first is the default.
SHIPPED = {"gru": ("basic_motions_gru.sgru", "basic_motions_gru.json"),
           "lstm": ("basic_motions_lstm.sgru", "basic_motions_lstm.json")}
DEFAULT_MODEL = DATA_DIR / SHIPPED["gru"][0]
HELDOUT = DATA_DIR / "basic_motions_heldout.npz"


@dataclass(frozen=True)
class DefaultData:
    """A shipped model, the held-out data and the model's training record.

    Attributes
    ----------
    model : GRUModel
        ``"gru"``: GRU(6->64) x2 -> Dense(64->4, softmax); ``"lstm"``: LSTM(6->32) x2 ->
        Dense(32->4, softmax).
    x : numpy.ndarray, (40, 100, 6) float32
        The held-out recordings, raw sensor values (accelerometer xyz, gyroscope xyz).
    y : numpy.ndarray, (40,) int64
        Their class indices into ``classes``.
    classes : tuple of str
    record : dict
        The training record (``basic_motions_<name>.json``): accuracy, seed, versions, hashes.
    name : str
        The key of :data:`SHIPPED`.
    """

    model: GRUModel
    x: np.ndarray
    y: np.ndarray
    classes: tuple
    record: dict
    name: str = "gru"

    @property
    def path(self):
        """The model file."""
        return DATA_DIR / SHIPPED[self.name][0]

    @property
    def reference_accuracy(self):
        """PyTorch's held-out accuracy at sequence end, measured when the model was trained."""
        return float(self.record["heldout_accuracy_at_sequence_end"]["torch"])


def load_default(name="gru"):
    """Load a shipped model (:data:`SHIPPED`; the GRU by default), the held-out slice and the
    model's training record (no download).

    Examples
    --------
    >>> from streamgru.harness.demo import load_default
    >>> d = load_default()
    >>> d.model.input_size, d.model.output_size, d.x.shape, d.classes[:2]
    (6, 4, (40, 100, 6), ('Standing', 'Running'))
    >>> [layer.kind for layer in load_default("lstm").model.layers]
    ['lstm', 'lstm', 'dense']
    """
    if not isinstance(name, str) or name not in SHIPPED:
        raise ValueError(f"name: expected one of {', '.join(map(repr, SHIPPED))}, got {name!r}")
    model_file, record_file = SHIPPED[name]
    with np.load(HELDOUT) as f:
        x, y, classes = f["x"], f["y"], tuple(str(c) for c in f["classes"])
    record = json.loads((DATA_DIR / record_file).read_text())
    return DefaultData(load(DATA_DIR / model_file), x, y, classes, record, name)


@dataclass
class Workload:
    """Events in broker order. ``keys`` (E,) int64 device ids; ``x`` (E, input_size) float32;
    ``last`` (E,) bool: the device's final event; ``seq`` (streams,) the recording each replays;
    ``steps``: the length of a recording."""

    keys: np.ndarray
    x: np.ndarray
    last: np.ndarray
    seq: np.ndarray
    steps: int


def make_workload(x, streams, seed=0):
    """Interleave ``streams`` replays of the recordings ``x`` (n, T, I) in broker order.

    Device ``d`` replays recording ``d % n`` from its first step, starting at a random tick in
    ``[0, T)``; events are sorted by tick, devices shuffled within a tick.

    Examples
    --------
    >>> import numpy as np
    >>> w = make_workload(np.zeros((2, 5, 3), np.float32), streams=4)
    >>> w.keys.shape, w.x.shape, int(w.last.sum()), w.seq.tolist()
    ((20,), (20, 3), 4, [0, 1, 0, 1])
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"x: expected recordings of shape (n, T, input_size), got {x.shape}")
    if isinstance(streams, bool) or not isinstance(streams, (int, np.integer)) or streams < 1:
        raise ValueError(f"streams: expected a positive int, got {streams!r}")
    n, T, _ = x.shape
    rng = np.random.default_rng(seed)
    seq = np.arange(streams) % n
    start = rng.integers(0, T, size=streams)
    dev = np.repeat(np.arange(streams), T)
    t = np.tile(np.arange(T), streams)
    tick = start[dev] + t
    order = np.lexsort((rng.random(dev.size), tick))  # by tick, random within a tick
    dev, t = dev[order], t[order]
    return Workload(dev.astype(np.int64), np.ascontiguousarray(x[seq[dev], t]), t == T - 1, seq, T)


@dataclass
class Contender:
    """Per-contender measurements: ``latency`` (batches,) seconds of each micro-batch call."""

    name: str
    threads: str
    latency: np.ndarray
    events: int
    final: np.ndarray  # (streams, output_size) output at each device's last step
    done: np.ndarray   # (streams,) bool: the device's last event was processed
    note: str = ""

    @property
    def events_per_s(self):
        return self.events / self.latency.sum() if self.latency.size else 0.0


@dataclass
class DemoResult:
    """What ``run_demo`` measured. ``accuracy`` maps a contender's name to its accuracy at
    sequence end over the held-out recordings (None when the inputs were not the held-out set);
    ``missing_accuracy`` maps a missing-value policy to the engine's accuracy with
    ``missing_rate`` of the held-out values dropped (empty when not measured)."""

    contenders: list
    streams: int
    batch: int
    accuracy: dict = field(default_factory=dict)
    reference_accuracy: float | None = None
    plot: str | None = None
    missing_accuracy: dict = field(default_factory=dict)
    missing_rate: float = 0.0
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# the contenders


def _run_engine(model, w, batch, threads, seconds, progress):
    from ..engine import Engine

    warm = Engine(model, threads=threads)
    warm.step(np.arange(batch), w.x[:batch])  # JIT compile/load outside the timing
    engine = Engine(model, threads=threads, capacity=max(1024, int(w.keys.max()) + 1))
    return _drive("streamgru", f"numba {threads or 'default'}", w, batch, seconds, progress,
                  engine.step, model.output_size)


def _run_ort(model, w, batch, threads, seconds, progress):
    from .bench import OrtContender

    # The user-side store around onnxruntime (key -> slot, gather, run, scatter; waves for a
    # device listed twice), as `streamgru bench` runs it. intra_op 0: onnxruntime's default.
    ort = OrtContender(model, threads or 0)
    ort.step(np.arange(-batch, 0), w.x[:batch])  # warm-up, on keys no device uses
    return _drive("onnxruntime", f"intra_op {threads or 'default'}", w, batch, seconds, progress,
                  ort.step, model.output_size)


def _drive(name, threads, w, batch, seconds, progress, step, n_out):
    E = w.keys.size
    nb = -(-E // batch)
    lat = np.empty(nb)
    streams = w.seq.size
    final = np.zeros((streams, n_out), np.float32)
    done = np.zeros(streams, bool)
    bar = _Progress(name, E, progress)
    perf = time.perf_counter
    deadline = perf() + seconds
    n_done = events = 0
    for b in range(nb):
        lo, hi = b * batch, min((b + 1) * batch, E)
        k = w.keys[lo:hi]
        t0 = perf()
        y = step(k, w.x[lo:hi])
        t1 = perf()
        lat[b] = t1 - t0
        end = w.last[lo:hi]
        if end.any():
            final[k[end]] = y[end]
            done[k[end]] = True
        events, n_done = hi, b + 1
        bar.update(events)
        if t1 > deadline:
            break
    bar.close()
    note = "" if events == E else f"stopped after {seconds:g} s"
    return Contender(name, threads, lat[:n_done], events, final, done, note)


# ----------------------------------------------------------------------------------------------
# missing values


def drop_readings(x, rate, seed=0):
    """``x`` with each value replaced by NaN (a missing value) with probability ``rate``.

    Parameters
    ----------
    x : numpy.ndarray, (n, T, I)
        Recordings.
    rate : float
        Probability in [0, 1] that a value is dropped; values are dropped independently (one
        channel of one reading at a time).
    seed : int

    Returns
    -------
    numpy.ndarray, (n, T, I) float32

    Examples
    --------
    >>> import numpy as np
    >>> x = drop_readings(np.ones((40, 100, 6)), 0.1)
    >>> x.dtype, bool(0.09 < np.isnan(x).mean() < 0.11)
    (dtype('float32'), True)
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise ValueError(f"rate: expected a probability in [0, 1], got {rate!r}")
    x = np.array(x, dtype=np.float32)
    x[np.random.default_rng(seed).random(x.shape) < rate] = np.nan
    return x


def missing_accuracy(model, x, labels, rate=0.1, seed=0, batch=256, threads=None,
                     policies=("skip", "zero", "last")):
    """The engine's accuracy at sequence end on recordings with ``rate`` of their values dropped,
    under each missing-value policy.

    For each policy, :func:`replay_with_missing`; a recording's class is the argmax of the
    output at its last step.

    Parameters
    ----------
    model : GRUModel
    x : numpy.ndarray, (n, T, input_size)
    labels : numpy.ndarray, (n,) int
    rate : float
    seed : int
    batch : int
    threads : int, optional
    policies : sequence of {"skip", "zero", "last"}

    Returns
    -------
    dict
        policy -> accuracy (float).

    Examples
    --------
    >>> d = load_default()
    >>> acc = missing_accuracy(d.model, d.x, d.y, rate=0.0)
    >>> acc == {"skip": 1.0, "zero": 1.0, "last": 1.0}
    True
    """
    labels = np.asarray(labels)
    return {policy: float(np.mean(replay_with_missing(model, x, policy, rate, seed, batch,
                                                      threads).argmax(axis=1) == labels))
            for policy in policies}


def replay_with_missing(model, x, policy, rate=0.1, seed=0, batch=256, threads=None):
    """Each recording's output at its last step, with ``rate`` of its values dropped, through
    ``Engine(model, missing=policy)``.

    ``x`` goes through :func:`drop_readings` (``rate``, ``seed``), then every recording is replayed
    as one device, interleaved in broker order (:func:`make_workload`, ``seed``) and stepped in
    micro-batches of ``batch`` events (a device may appear twice in one).

    Returns
    -------
    numpy.ndarray, (n, output_size) float32
    """
    from ..engine import Engine

    x = np.asarray(x)
    w = make_workload(drop_readings(x, rate, seed), streams=x.shape[0], seed=seed)
    engine = Engine(model, threads=threads, missing=policy)
    c = _drive(policy, "", w, batch, float("inf"), False, engine.step, model.output_size)
    return c.final


# ----------------------------------------------------------------------------------------------
# the run, the table, the plot


def run_demo(streams=4096, batch=256, events=None, seconds=20.0, threads=None, model=None,
             plot="default", ort=True, seed=0, progress=None, out=None, missing_rate=0.1):
    """Run the demo workload through the engine (and onnxruntime), print the table.

    Parameters
    ----------
    streams : int
        Simulated devices; each replays one held-out recording (100 events).
    batch : int
        Events per micro-batch (one ``Engine.step`` call).
    events : int, optional
        Stop after this many events (default: every device's full recording).
    seconds : float
        Wall-clock cap per contender; a contender that reaches it stops early (said in the
        table).
    threads : int, optional
        Numba threads for the engine and ``intra_op_num_threads`` for onnxruntime (default:
        each library's own default, one per core).
    model : str, path or GRUModel, optional
        A name of :data:`SHIPPED` (``"gru"``, the default, or ``"lstm"``): that shipped
        BasicMotions classifier. Another model with input_size 6 replays the same recordings
        (accuracy is reported when it has 4 outputs, and checked against PyTorch's when it is
        one of the shipped models); any other input size replays seeded random inputs.
    plot : str, path or None
        PNG file for the latency plot ("default": ``streamgru-demo.png`` in the temp directory;
        None: no plot). Needs matplotlib.
    ort : bool
        Also run onnxruntime when it is installed.
    progress : bool, optional
        Progress bar on stderr (default: when stderr is a terminal).
    out : file, optional
        Where the table goes (default ``sys.stdout``).
    missing_rate : float
        Fraction of the held-out values dropped for the per-policy accuracy
        (:func:`missing_accuracy`; 0 skips it). Measured only on the held-out recordings.

    Returns
    -------
    DemoResult

    Examples
    --------
    >>> import io
    >>> from streamgru.harness.demo import run_demo
    >>> r = run_demo(streams=80, batch=32, seconds=600, ort=False, plot=None,
    ...              out=io.StringIO())  # seconds: never cut short, even on a loaded machine
    >>> r.accuracy["streamgru"] == r.reference_accuracy, r.contenders[0].events
    (True, 8000)
    """
    out = out if out is not None else sys.stdout
    for name, v in (("streams", streams), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if events is not None and (isinstance(events, bool) or not isinstance(events, (int, np.integer))
                               or events < 1):
        raise ValueError(f"events: expected a positive int or None, got {events!r}")
    if not (isinstance(seconds, (int, float)) and seconds > 0):
        raise ValueError(f"seconds: expected a positive number, got {seconds!r}")
    if isinstance(missing_rate, bool) or not isinstance(missing_rate, (int, float)) \
            or not 0 <= missing_rate <= 1:
        raise ValueError(f"missing_rate: expected a fraction in [0, 1], got {missing_rate!r}")
    shipped = [load_default(name) for name in SHIPPED]
    default = shipped[0]
    labels, label = default.y, "BasicMotions"
    if model is None or (isinstance(model, str) and model in SHIPPED):
        d = shipped[list(SHIPPED).index(model or default.name)]
        model, path = d.model, d.path
    elif isinstance(model, GRUModel):
        path = "(in memory)"
    else:
        path, model = model, load(model)
    # PyTorch's accuracy applies to the very weights it was measured on: a shipped model's.
    reference = next((d.reference_accuracy for d in shipped
                      if d.model.fingerprint == model.fingerprint), None)
    if model.input_size == default.x.shape[2]:
        recordings = default.x
        if model.output_size != len(default.classes):
            labels = None
    else:
        recordings = np.random.default_rng(seed).normal(
            size=(40, 100, model.input_size)).astype(np.float32)
        labels, label = None, "random inputs"
    w = make_workload(recordings, streams, seed)
    if events is not None and events < w.keys.size:
        w = Workload(w.keys[:events], w.x[:events], w.last[:events], w.seq, w.steps)
    if progress is None:
        progress = sys.stderr.isatty()

    contenders = [_run_engine(model, w, batch, threads, seconds, progress)]
    ort_note = ""
    if ort:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            ort_note = "onnxruntime not installed: pip install 'streamgru[demo]' to compare"
        else:
            contenders.append(_run_ort(model, w, batch, threads, seconds, progress))

    result = DemoResult(contenders, streams, batch, reference_accuracy=reference, seed=seed)
    if labels is not None:
        for c in contenders:
            result.accuracy[c.name] = _sequence_accuracy(c, w.seq, labels)
        if missing_rate > 0:
            result.missing_rate = float(missing_rate)
            result.missing_accuracy = missing_accuracy(model, recordings, labels, missing_rate,
                                                       seed, batch, threads)
    if plot is not None:
        result.plot = _plot(contenders, batch, plot, out)
    _table(result, model, path, label, w, threads, ort_note, out)
    return result


def _sequence_accuracy(c, seq, labels):
    """Accuracy at sequence end over the recordings some device finished; None if none did.

    Every device replaying a recording must predict the same class (it saw the same inputs)."""
    pred = c.final.argmax(axis=1)
    right = []
    for s in np.unique(seq[c.done]):
        p = np.unique(pred[c.done & (seq == s)])
        if p.size != 1:
            c.note = (c.note + "; " if c.note else "") + f"devices replaying recording {s} disagree"
        right.append(p[0] == labels[s])
    return float(np.mean(right)) if right else None


def _table(r, model, path, label, w, threads, ort_note, out):
    layers = ", ".join(f"{ly.kind.upper()}({ly.input_size}->{ly.hidden_size})" if ly.recurrent
                       else f"Dense({ly.output_size}, {ly.activation[0]})" for ly in model.layers)
    n_rec, T = int(w.seq.max()) + 1, w.steps
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"model     {path}: {layers}")
    p(f"kernels   {TILE.describe()}")
    p(f"workload  {r.streams} simulated devices replaying {min(n_rec, r.streams)} {label} "
      f"recordings ({T} steps at 10 Hz) from random start ticks; micro-batches of {r.batch} events")
    p("")
    head = (f"{'':<12} {'streams':>8} {'events':>9} {'events/s':>11} {'p50 us':>9} {'p99 us':>9} "
            f"{'accuracy':>9}  threads")
    p(head)
    p("-" * len(head))
    for c in r.contenders:
        acc = r.accuracy.get(c.name)
        lat = c.latency * 1e6
        p(f"{c.name:<12} {r.streams:>8} {c.events:>9} {c.events_per_s:>11,.0f} "
          f"{np.percentile(lat, 50):>9.1f} {np.percentile(lat, 99):>9.1f} "
          f"{'-' if acc is None else f'{acc:.4f}':>9}  {c.threads}"
          + (f"  ({c.note})" if c.note else ""))
    p("")
    p("p50/p99: latency of one micro-batch call (onnxruntime: including the user-side gather and "
      "scatter of states)")
    if len(r.contenders) > 1:
        a, b = r.contenders
        p(f"speed-up  {a.events_per_s / b.events_per_s:.1f}x events/s, "
          f"{np.percentile(b.latency, 50) / np.percentile(a.latency, 50):.1f}x p50 latency "
          f"(streamgru vs onnxruntime)")
    elif ort_note:
        p(ort_note)
    mine = r.accuracy.get("streamgru")
    if r.reference_accuracy is not None and mine is not None:
        verdict = "equal" if mine == r.reference_accuracy else "DIFFERENT"
        p(f"accuracy  at sequence end over the held-out recordings: streamgru {mine:.4f}, "
          f"PyTorch (recorded at training) {r.reference_accuracy:.4f}: {verdict}")
    if r.missing_accuracy:
        per = ", ".join(f"{k} {v:.4f}" for k, v in r.missing_accuracy.items())
        clean = "" if mine is None else f" (clean: {mine:.4f})"
        p(f"missing   {r.missing_rate:.0%} of the held-out sensor values dropped at random "
          f"(seed {r.seed}), each recording replayed once through Engine(missing=...):")
        p(f"          accuracy at sequence end by policy: {per}{clean}")
    if r.plot:
        p(f"plot      {r.plot}")


def _plot(contenders, batch, path, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: skipped, matplotlib is not installed", file=out)
        return None
    path = Path(tempfile.gettempdir()) / "streamgru-demo.png" if path == "default" else Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, c in enumerate(contenders):
        lat, color = c.latency * 1e6, f"C{i}"
        t = np.cumsum(c.latency)
        ax1.plot(t, lat, ".", ms=2, alpha=0.3, color=color)
        k = min(51, max(1, lat.size // 20) | 1)
        med = np.array([np.median(lat[max(0, i - k // 2): i + k // 2 + 1]) for i in range(lat.size)])
        ax1.plot(t, med, lw=1.5, color=color, label=f"{c.name} (running median)")
        ax2.plot(np.sort(lat), np.linspace(0, 1, lat.size), lw=1.5, color=color, label=c.name)
    ax1.set(xlabel="time spent in step calls (s)", ylabel=f"latency per micro-batch of {batch} (us)",
            yscale="log", title="latency over the replay")
    ax2.set(xlabel=f"latency per micro-batch of {batch} (us)", ylabel="fraction of micro-batches",
            xscale="log", title="latency distribution")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax, axis in ((ax1, ax1.yaxis), (ax2, ax2.xaxis)):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        # Plain numbers on the log axis, and no labels on minor ticks (they overlapped).
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


class _Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, name, total, enabled):
        self.name, self.total, self.enabled = name, max(total, 1), enabled
        self.t0 = self.last = time.perf_counter()

    def update(self, done):
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.1 and done < self.total:
            return
        self.last = now
        frac = done / self.total
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        sys.stderr.write(f"\r  {self.name:<12} [{bar}] {frac:4.0%} {done:>9} events "
                         f"{now - self.t0:5.1f} s")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            self.update(self.total)
            sys.stderr.write("\n")
            sys.stderr.flush()


def main(args):
    """The ``streamgru demo`` verb (argparse namespace from ``streamgru.cli``)."""
    plot = None if args.plot in ("none", "") else args.plot
    run_demo(streams=args.streams, batch=args.batch, events=args.events, seconds=args.seconds,
             threads=args.threads, model=args.model, plot=plot, ort=not args.no_ort,
             missing_rate=args.missing_rate)
    return 0
