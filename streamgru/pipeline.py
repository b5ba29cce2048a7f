"""``streamgru run MODEL``: the engine in a shell pipeline.

Events come in on stdin (or ``--input FILE``), one per line, and for every event one line goes
out, in input order::

    {"key": "sensor-17", "x": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}    ->  {"key": "sensor-17", "y": [...]}

``--format csv`` reads ``key,x1,...,xI`` rows instead (keys are then strings; a first line whose
first field is ``key`` is a header and skipped, unless the run resumes mid-input). JSON keys are
strings or integers, one kind per run (the first event decides, or the restored checkpoint);
fields other than ``key`` and ``x`` are ignored. Outputs are float32 values printed with 9
significant digits (float32 round-trips exactly), or 17 with ``--dtype float64``.

Micro-batches: lines are gathered until ``--max-batch`` events are waiting or ``--max-wait-ms``
has passed since the first of them arrived, then stepped in one ``Engine.step`` call. A stream
that appears several times in a batch is stepped once per event, in order, as if the events had
come one by one.

Malformed lines (not UTF-8, not JSON or CSV, a missing key, a key of the other kind or with a
NUL character, ``x`` of the wrong width, non-numeric or non-finite values, or values beyond
float32's range in a float32 run) are reported on stderr with their line number and skipped.
So are events the engine refuses (``NonFiniteError``: the step would make a state or output
NaN or infinite): such an event changes nothing, as if its line were absent, and the batch's
other events are stepped. Nothing else is lost or reordered. With ``--strict`` the first such
line stops the run (exit status 1) after the events before it have been processed and
checkpointed.

Missing values (``null`` in JSON, an empty CSV field, NaN) follow ``--missing``: with
"refuse" (the default) the line is malformed, as above; with "skip", "zero" or "last" the
value is NaN in the event's ``x`` and the engine's policy of that name handles it (the stream
holds its state and outputs it, or the value is replaced by 0 or by the stream's last observed
value). Infinity is never a missing value. The checkpoint records the policy, and a resume
under another one is refused (exit status 2).

Checkpoints (``--state FILE``)
------------------------------
FILE is one state snapshot (``Engine.save_state``) whose metadata also records how much input
its states cover: ``input_lines`` (every line up to and including the last one whose event is
in the states, counting blank and malformed lines), ``events`` and ``input_format``. One atomic
write (temp file, fsync, rename) stores both, so a crash, even ``kill -9``, leaves the previous
checkpoint or the new one, each with its own exact line count, never a torn file and never a
count of another write. At start, FILE (if it exists) restores every stream and the command says
on stderr where to continue the input (line ``input_lines + 1``; line numbers count from the
start of the logical input across restarts). A snapshot without that record (a plain
``Engine.save_state`` file) is refused: the line to continue from cannot be known. The
directory must be writable: that is checked before the first event.

The states are written to FILE every ``--checkpoint-every`` seconds (when something changed),
at the end of the input, on SIGTERM or SIGINT (the batch in hand is finished first), and
whenever the run stops early. A checkpoint covers exactly the events whose outputs were
written: a batch whose outputs cannot be written (the reader is gone, the disk is full) is taken
back from the states first. Feeding the input again from the line named (e.g. ``tail -n +$((L
+ 1)) events.jsonl``) then continues every stream exactly as an uninterrupted run would, bit
for bit; outputs written after the checkpoint are written again (at-least-once output,
exactly-once state). An output *file* that fails mid-batch is truncated back to the last whole
batch, so resuming into the same file writes each output exactly once.

Exit status: 0 at the end of the input; 1 on a malformed or refused line with ``--strict``; 2
on a usage error, before any event is read (model file unloadable, bad option, unusable
``--state``); 3 when the output or the input failed (input left unprocessed; the checkpoint
covers the events whose outputs were written); 4 when a checkpoint could not be written (the
previous one stays valid; the message says where to continue); 70 on an internal error (a
non-finite output reached the writer: refused, never printed); 128 + N on signal N.
"""

from __future__ import annotations

import csv
import json
import math
import os
import queue
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

__all__ = ["add_arguments", "main", "parse_line"]

_EOF = object()
CHECKPOINT_KIND = "streamgru-run-checkpoint"
CHECKPOINT_VERSION = 1
# The smallest magnitude that rounds to infinity in float32 (2**128 - 2**103, halfway between
# float32's largest finite value and 2**128): finite doubles at or above it overflow.
_F32_OVERFLOW = float.fromhex("0x1.ffffffp127")
# The engine's missing-value policies, in the order --help lists them (refuse: the default).
MISSING_POLICIES = ("refuse", "skip", "zero", "last")
_TAKES_MISSING = "; --missing skip, zero or last steps it"


def add_arguments(p):
    """Add the ``run`` verb's options to an argparse parser."""
    p.add_argument("model", help="model file (.sgru or any format streamgru.load reads)")
    p.add_argument("--input", "-i", default="-", help="events file (default: stdin)")
    p.add_argument("--output", "-o", default="-",
                   help="output file, appended to (default: stdout)")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl",
                   help="input format (default jsonl)")
    p.add_argument("--max-batch", type=int, default=256,
                   help="most events per engine call (default 256)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest wait for a batch to fill, from its first event (default 5)")
    p.add_argument("--state", default=None,
                   help="checkpoint file: restored at start, written atomically while running")
    p.add_argument("--checkpoint-every", type=float, default=10.0,
                   help="seconds between checkpoints (default 10)")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--missing", choices=list(MISSING_POLICIES), default="refuse",
                   help="what a missing value (null in JSON, an empty CSV field, NaN) does: "
                        "refuse (default: the line is malformed and skipped), skip (the stream "
                        "does not advance; its output is the model's for its held state), zero "
                        "(replaced by 0), last (replaced by the stream's last observed value of "
                        "that feature, 0 before any)")
    p.add_argument("--threads", type=int, default=None, help="Numba threads for large batches")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port at /metrics while running (0: a "
                        "free port, printed on stderr); needs the metrics extra")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics endpoint binds (default 127.0.0.1)")


def parse_line(text, fmt, input_size, key_kind=None, dtype="float64", with_time=False,
               missing="refuse"):
    """Parse one input line into ``(key, x)``, or raise ValueError saying what is wrong.

    Parameters
    ----------
    text : str
        The line, without its newline.
    fmt : {"jsonl", "csv"}
    input_size : int
        The model's input width.
    key_kind : {None, int, str}
        The kind of key this run holds (None: any).
    dtype : {"float64", "float32"}
        The engine's dtype: with float32, a value that would overflow it (|x| >= 2**128 - 2**103,
        e.g. ``1e39``) is refused like a non-finite one.
    with_time : bool
        Also return the event's time: a JSON event's optional ``t`` field, Unix seconds, when it
        is a finite number (else None; never a reason to refuse the line). CSV rows have none.
    missing : {"refuse", "skip", "zero", "last"}
        The run's ``--missing`` policy. A missing value is ``null`` in JSON, an empty (or blank)
        CSV field, or NaN (JSON's ``NaN``, CSV's ``nan``). With "refuse" it makes the line
        malformed, as a NaN always did; with any other policy it becomes NaN in ``x``, which
        the engine handles by that policy. Infinity is never missing: always malformed.

    Returns
    -------
    (int or str, list of float), or (key, x, float or None) with ``with_time``

    Examples
    --------
    >>> parse_line('{"key": "a", "x": [1, 2.5]}', "jsonl", 2)
    ('a', [1.0, 2.5])
    >>> parse_line("a,1,2.5", "csv", 2)
    ('a', [1.0, 2.5])
    >>> parse_line('{"key": "a", "x": [1]}', "jsonl", 2)
    Traceback (most recent call last):
    ...
    ValueError: x: expected 2 numbers (the model's input_size), got 1
    >>> parse_line('{"key": "a", "x": [1, null]}', "jsonl", 2, missing="last")
    ('a', [1.0, nan])
    >>> parse_line("a,,2.5", "csv", 2, missing="zero")
    ('a', [nan, 2.5])
    >>> parse_line("a,,2.5", "csv", 2)
    Traceback (most recent call last):
    ...
    ValueError: x: expected numbers, got a missing value (an empty field) at index 0; ...
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing: expected one of {', '.join(MISSING_POLICIES)}, got "
                         f"{missing!r}")
    allow = missing != "refuse"
    if fmt == "csv":
        try:
            fields = next(csv.reader([text]))
        except (csv.Error, StopIteration) as exc:
            raise ValueError(f"expected a CSV row key,x1,...,x{input_size}, got {exc}") from None
        if len(fields) != input_size + 1:
            raise ValueError(f"expected {input_size + 1} CSV fields (key + input_size "
                             f"{input_size} values), got {len(fields)}")
        key, raw = fields[0], fields[1:]
        gaps = [i for i, v in enumerate(raw) if not v.strip()]
        if gaps and not allow:
            raise ValueError(f"x: expected numbers, got a missing value (an empty field) at index "
                             f"{gaps[0]}{_TAKES_MISSING}")
        try:
            x = [math.nan if not v.strip() else float(v) for v in raw]
        except ValueError:
            bad = next(v for v in raw if v.strip() and not _is_float(v))
            raise ValueError(f"x: expected numbers, got {bad!r}") from None
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f'expected a JSON object {{"key": ..., "x": [...]}}, got invalid '
                             f"JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict) or "key" not in obj or "x" not in obj:
            got = type(obj).__name__ if not isinstance(obj, dict) else f"keys {sorted(obj)}"
            raise ValueError(f'expected a JSON object {{"key": ..., "x": [...]}}, got {got}')
        key, raw = obj["key"], obj["x"]
        if not isinstance(raw, list):
            raise ValueError(f"x: expected a list of {input_size} numbers, got "
                             f"{type(raw).__name__}")
        if len(raw) != input_size:
            raise ValueError(f"x: expected {input_size} numbers (the model's input_size), got "
                             f"{len(raw)}")
        bad = [v for v in raw if v is not None and (isinstance(v, bool)
                                                     or not isinstance(v, (int, float)))]
        if bad:
            raise ValueError(f"x: expected numbers, got {json.dumps(bad[0])}")
        if not allow and None in raw:
            raise ValueError(f"x: expected numbers, got a missing value (null) at index "
                             f"{raw.index(None)}{_TAKES_MISSING}")
        x = [math.nan if v is None else float(v) for v in raw]
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ValueError(f"key: expected a string or an integer, got {json.dumps(key)}")
        if isinstance(key, int) and not -(2**63) <= key < 2**63:
            raise ValueError(f"key: expected an integer within int64, got {key}")
    if len(x) != input_size:
        raise ValueError(f"x: expected {input_size} numbers (the model's input_size), got {len(x)}")
    bad = [i for i, v in enumerate(x) if not math.isfinite(v) and not (allow and math.isnan(v))]
    if bad:
        hint = _TAKES_MISSING if math.isnan(x[bad[0]]) else ""
        raise ValueError(f"x: expected finite numbers, got {x[bad[0]]} at index {bad[0]}{hint}")
    if dtype == "float32":
        bad = [i for i, v in enumerate(x) if abs(v) >= _F32_OVERFLOW]
        if bad:
            raise ValueError(f"x: expected numbers within float32's range (|x| <= 3.4028235e38), "
                             f"got {x[bad[0]]!r} at index {bad[0]}; --dtype float64 takes it")
    if isinstance(key, str):
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"key: expected a string encodable as UTF-8, got {key!r}") from None
        if "\0" in key:
            raise ValueError(f"key: expected a string without NUL characters, got {key!r}")
    if key_kind is not None and type(key) is not key_kind:
        kind = "an int" if key_kind is int else "a str"
        raise ValueError(f"key: expected {kind} key like this run's others (one kind per run), "
                         f"got {json.dumps(key)}")
    if with_time:
        t = obj.get("t") if fmt != "csv" else None
        ok = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
        return key, x, float(t) if ok else None
    return key, x


def _is_float(v):
    try:
        float(v)
        return True
    except ValueError:
        return False


class _Checkpoint:
    """The ``--state`` file: every stream's state plus, in the same file's metadata, how much input
    those states cover. One atomic write (``Engine.save_state``) records both, so the line count
    can never belong to another write than the states."""

    def __init__(self, path, fmt, missing):
        self.path = Path(path)
        self.fmt = fmt
        self.missing = missing

    def probe(self):
        """Refuse, before the first event, a directory where the checkpoint cannot be written
        (missing, not a directory, read-only, full): create, write, fsync and remove a temp file."""
        directory = self.path.parent if str(self.path.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".probe",
                                       dir=directory)
            try:
                os.write(fd, b"streamgru run: checking that checkpoints can be written here\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(tmp)
        except OSError as exc:
            raise ValueError(f"--state: expected a file in a writable directory, got {self.path} "
                             f"({exc.strerror or exc}); no event was read") from None

    def restore(self, engine):
        """Load the states; return the (input_lines, events) they cover, (0, 0) if no file yet."""
        if not self.path.exists():
            return 0, 0
        meta = engine.load_state(self.path).metadata
        if not isinstance(meta, dict) or meta.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"--state: expected a checkpoint written by streamgru run (states and "
                             f"the input lines they cover, in one file), got a state snapshot "
                             f"without a line count in {self.path} (saved by Engine.save_state or "
                             f"an older streamgru run?); where to continue the input cannot be "
                             f"known, so nothing was run. Give another --state file to start "
                             f"from zero states")
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"--state: expected a {CHECKPOINT_KIND} of version "
                             f"{CHECKPOINT_VERSION}, got version {meta.get('version')!r} in "
                             f"{self.path}; this streamgru cannot resume from it")
        lines, events = meta.get("input_lines"), meta.get("events")
        if not all(type(v) is int and v >= 0 for v in (lines, events)) or events > lines:
            raise ValueError(f"--state: expected input_lines >= events >= 0 in {self.path}, got "
                             f"{lines!r} and {events!r}")
        if meta.get("input_format") != self.fmt:
            raise ValueError(f"--format: expected {meta.get('input_format')!r}, the format of the "
                             f"input whose lines {self.path} counts, got {self.fmt!r}")
        # The "last" memory and which events were stepped depend on the policy: resuming under
        # another one would not continue the streams as the run that wrote the file would have.
        # A checkpoint written before --missing existed records none and resumes under any.
        recorded = meta.get("missing", self.missing)
        if recorded != self.missing:
            raise ValueError(f"--missing: expected {recorded!r}, the policy of the run that wrote "
                             f"{self.path}, got {self.missing!r}; give --missing {recorded}, or "
                             f"another --state file to start from zero states")
        return lines, events

    def write(self, engine, lines, events):
        engine.save_state(self.path, metadata={
            "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "input_lines": lines,
            "events": events, "input_format": self.fmt, "missing": self.missing,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _reader(stream, q):
    try:
        for i, raw in enumerate(stream, 1):
            q.put((i, raw))
    except Exception as exc:  # noqa: BLE001 - handed to the main thread, which reports it
        q.put(exc)
        return
    q.put(_EOF)


def _next_batch(q, max_batch, wait_s):
    """Up to ``max_batch`` lines; waits at most ``wait_s`` after the first.

    Returns (items, end): ``end`` is None (more may come), ``_EOF``, or the exception that
    stopped the reader, after the lines read before it.
    """
    items = []
    try:
        item = q.get(timeout=0.1)  # wake up regularly for checkpoints and signals
    except queue.Empty:
        return items, None
    deadline = time.monotonic() + wait_s
    while True:
        if item is _EOF or isinstance(item, Exception):
            return items, item
        items.append(item)
        if len(items) >= max_batch:
            return items, None
        try:
            item = q.get_nowait()
        except queue.Empty:
            left = deadline - time.monotonic()
            if left <= 0:
                return items, None
            try:
                item = q.get(timeout=left)
            except queue.Empty:
                return items, None


def _step_batch(engine, keys, x, strict):
    """Step a batch; an event the engine refuses is left out, as if its line were absent.

    ``Engine.step`` changes nothing when it raises, so a refused batch is stepped again: with
    ``NonFiniteError``, the events of the keys it names one at a time and the others in one call;
    otherwise (or with ``strict``, which must stop at the first refusal in input order) every
    event one at a time, in order.

    Returns (done, y, refused): the indices stepped (increasing), their outputs ``(len(done),
    output_size)``, and ``(index, reason)`` of each refused event. With ``strict``, ``done`` is
    the prefix of the batch before the first refusal.
    """
    from .errors import NonFiniteError

    n = len(keys)
    try:
        return list(range(n)), engine.step(keys, x), []
    except NonFiniteError as exc:
        suspects = set(exc.keys).intersection(keys)
    except ValueError:
        suspects = None
    if strict or not suspects or n == 1:
        together, alone = [], list(range(n))
    else:
        together = [i for i in range(n) if keys[i] not in suspects]
        alone = [i for i in range(n) if keys[i] in suspects]
    y = np.empty((n, engine.model.output_size), engine.dtype)
    ok = np.zeros(n, bool)
    refused = []
    if together:
        done, y_done, refused = _step_batch(engine, [keys[i] for i in together], x[together],
                                            False)
        idx = [together[i] for i in done]
        y[idx], ok[idx] = y_done, True
        refused = [(together[i], why) for i, why in refused]
    for i in alone:
        try:
            y[i] = engine.step([keys[i]], x[i:i + 1])[0]
            ok[i] = True
        except ValueError as exc:
            refused.append((i, str(exc)))
            if strict:
                break
    done = np.flatnonzero(ok).tolist()
    return done, y[done], sorted(refused)


class _Undo:
    """The states of a batch's streams before it was stepped (and, under ``--missing last``,
    their last observed values), to take it back when its outputs could not be delivered (then
    the checkpoint covers exactly the delivered events)."""

    def __init__(self, engine, keys):
        self.engine = engine
        self.prior, self.new, self.memory = {}, [], {}
        last = engine.missing == "last"
        for k in dict.fromkeys(keys):  # one engine call per distinct key: open keys are the rule
            try:
                self.prior[k] = engine.state(k)
                if last:
                    self.memory[k] = engine.last_observed(k)
            except KeyError:
                self.new.append(k)

    def apply(self):
        for k, memory in self.memory.items():
            self.engine.set_last_observed(k, memory)
        for k, state in self.prior.items():
            self.engine.set_state(k, state)
        for k in self.new:
            if k in self.engine:
                self.engine.close(k)


class _RunStats:
    """The run's own series for ``--metrics-port``: updated by the run loop, read by scrapes
    (plain attributes, each replaced whole: a scrape sees the last value written)."""

    def __init__(self, checkpointing):
        self.lines = {"ok": 0, "malformed": 0, "refused": 0, "blank": 0}
        self.checkpoint_time = time.time() if checkpointing else None
        self.lag = None

    def collector(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.registry import Collector

        stats = self

        class RunCollector(Collector):
            def collect(self):
                lines = CounterMetricFamily(
                    "streamgru_run_lines", "Input lines read, by result: ok (event stepped, "
                    "output written), malformed (skipped), refused (by the engine), blank (blank "
                    "or CSV header).", labels=["result"])
                for result, n in stats.lines.items():
                    lines.add_metric([result], n)
                yield lines
                if stats.checkpoint_time is not None:
                    yield GaugeMetricFamily(
                        "streamgru_run_checkpoint_age_seconds", "Seconds since the last "
                        "checkpoint was written (since the start before the first).",
                        value=time.time() - stats.checkpoint_time)
                if stats.lag is not None:
                    yield GaugeMetricFamily(
                        "streamgru_run_input_lag_seconds", "When the last batch's outputs were "
                        "written: now minus the newest event's time t (Unix seconds).",
                        value=stats.lag)

            def describe(self):
                return []

        return RunCollector()


class _OutputError(Exception):
    """The outputs of a batch could not be written (the reader is gone, the disk is full)."""


class _NonFiniteOutput(Exception):
    """A NaN or infinity reached the writer: a bug, refused rather than printed as invalid JSON."""


def main(args):
    """Run the ``streamgru run`` verb (argparse namespace from :func:`add_arguments`)."""
    from .cli import load_model_arg
    from .engine import Engine

    if args.max_batch < 1:
        raise ValueError(f"--max-batch: expected a positive int, got {args.max_batch}")
    if not args.max_wait_ms >= 0:
        raise ValueError(f"--max-wait-ms: expected a number >= 0, got {args.max_wait_ms}")
    if not args.checkpoint_every > 0:
        raise ValueError(f"--checkpoint-every: expected seconds > 0, got {args.checkpoint_every}")
    if args.metrics_port is not None:
        if not 0 <= args.metrics_port <= 65535:
            raise ValueError(f"--metrics-port: expected a port from 0 to 65535, got "
                             f"{args.metrics_port}")
        from .metrics import require_prometheus

        require_prometheus()  # ImportError (exit 2) before any event when the extra is missing
    model = load_model_arg(args.model, "model")
    engine = Engine(model, dtype=args.dtype, threads=args.threads, missing=args.missing)
    # From here on a SIGTERM or SIGINT only asks the run to stop after the batch in hand (and
    # before the first one if it comes during the restore): the checkpoint is always written.
    stop, previous = [], {}

    def on_signal(signum, frame):
        stop.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: no signal handling
            pass
    try:
        return _serve(args, model, engine, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(args, model, engine, stop):
    """The body of :func:`main` once the engine exists; ``stop`` collects the signals received.
    Returns the exit status."""

    err = sys.stderr
    ckpt = _Checkpoint(args.state, args.format, args.missing) if args.state else None
    base_lines = base_events = 0
    if ckpt is not None:
        existed = ckpt.path.exists()
        base_lines, base_events = ckpt.restore(engine)
        ckpt.probe()
        if existed:
            print(f"streamgru run: restored {len(engine)} streams from {ckpt.path}: the "
                  f"checkpoint covers input lines 1-{base_lines} ({base_events} events); continue "
                  f"the input at line {base_lines + 1}", file=err)
        else:
            print(f"streamgru run: no checkpoint in {ckpt.path} yet: every stream starts from "
                  f"zeros; the input starts at line 1", file=err)
    keys_now = engine.keys()
    key_kind = type(keys_now[0]) if keys_now else None
    run_stats = server = None
    if args.metrics_port is not None:
        from .metrics import serve

        run_stats = _RunStats(ckpt is not None)
        try:
            server = serve(engine, args.metrics_port, args.metrics_host, [run_stats.collector()])
        except OSError as exc:
            raise ValueError(f"--metrics-port: expected a port free to bind on "
                             f"{args.metrics_host}, got {args.metrics_port} "
                             f"({exc.strerror or exc})") from None
        print(f"streamgru run: metrics on {server.url}", file=err, flush=True)
    try:
        return _loop(args, model, engine, stop, ckpt, base_lines, base_events, key_kind,
                     run_stats)
    finally:
        if server is not None:
            server.close()


def _loop(args, model, engine, stop, ckpt, base_lines, base_events, key_kind, run_stats):
    """Read, step, write and checkpoint until the input ends or the run stops; the exit status."""
    err = sys.stderr
    with_time = run_stats is not None
    if args.format == "csv" and key_kind is int:
        raise ValueError(f"--format csv: expected a checkpoint with string keys (CSV keys are "
                         f"strings), got one with integer keys from {args.state}")

    try:
        src = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ValueError(f"--input: expected a readable file, got {args.input} "
                         f"({exc.strerror or exc})") from None
    try:
        out_fd = sys.stdout.fileno() if args.output == "-" else \
            os.open(args.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        if args.input != "-":
            src.close()
        raise ValueError(f"--output: expected a writable file, got {args.output} "
                         f"({exc.strerror or exc})") from None
    if args.output == "-":
        sys.stdout.flush()
    q = queue.Queue(maxsize=64 * args.max_batch)
    threading.Thread(target=_reader, args=(src, q), daemon=True, name="streamgru-reader").start()

    fmt32 = args.dtype == "float32"
    n_in = model.input_size
    lines_done = events = skipped = refused_lines = refused_all = blank = with_missing = 0
    # After a restore the input continues mid-file: its first line is not a CSV header.
    header_seen = args.format != "csv" or base_lines > 0
    last_ckpt, dirty, status, why = time.monotonic(), False, 0, None
    saved = base_lines  # input lines covered by the checkpoint file as it is now
    try:
        end = None
        while end is None and not stop:
            items, end = _next_batch(q, args.max_batch, args.max_wait_ms / 1000.0)
            keys, rows, ev_lines, last_line, failed, times = [], [], [], None, False, []
            gaps = []  # per event: whether its x holds a missing value (NaN)
            for i, raw in items:
                line_no = base_lines + i
                try:
                    text = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    text, bad_utf8 = None, (f"expected UTF-8 text, got byte "
                                            f"0x{raw[exc.start]:02x} at byte {exc.start + 1}")
                if text is not None and not text.strip():
                    last_line = i
                    blank += 1
                    continue
                if text is not None and not header_seen:
                    header_seen = True
                    if text.split(",", 1)[0].strip().strip('"').lower() == "key":
                        last_line = i
                        blank += 1
                        continue
                header_seen = True
                try:
                    if text is None:
                        raise ValueError(bad_utf8)
                    key, x, *t = parse_line(text, args.format, n_in, key_kind, args.dtype,
                                            with_time, args.missing)
                except ValueError as exc:
                    if args.strict:
                        print(f"streamgru run: line {line_no}: {exc}; stopping (--strict)", file=err)
                        failed = True
                        break
                    print(f"streamgru run: line {line_no}: {exc}; skipped", file=err)
                    skipped += 1
                    last_line = i
                    continue
                if key_kind is None:
                    key_kind = type(key)
                keys.append(key)
                rows.append(x)
                gaps.append(any(v != v for v in x))
                ev_lines.append(i)
                if t and t[0] is not None:
                    times.append(t[0])
                last_line = i
            if keys:
                undo = _Undo(engine, keys) if ckpt is not None else None
                done, y, refused = _step_batch(engine, keys, np.asarray(rows, engine.dtype),
                                               args.strict)
                for j, reason in refused:
                    action = "stopping (--strict)" if args.strict else "skipped"
                    print(f"streamgru run: line {base_lines + ev_lines[j]}: refused by the "
                          f"engine: {reason}; {action}", file=err)
                refused_lines += 0 if args.strict else len(refused)
                try:
                    _write(out_fd, [keys[j] for j in done], y, fmt32)
                except (_OutputError, _NonFiniteOutput) as exc:
                    if undo is not None:
                        undo.apply()
                    status = 70 if isinstance(exc, _NonFiniteOutput) else 3
                    why = str(exc)
                    break
                events += len(done)
                with_missing += sum(gaps[j] for j in done)
                refused_all += len(refused)
                if run_stats is not None and times:
                    run_stats.lag = time.time() - max(times)
                if refused and args.strict:
                    lines_done, dirty, status = ev_lines[refused[0][0]] - 1, True, 1
                    break
            if last_line is not None:
                lines_done = last_line
                dirty = True
            if run_stats is not None:
                run_stats.lines = {"ok": events, "malformed": skipped, "refused": refused_all,
                                   "blank": blank}
            if failed:
                status = 1
                break
            if isinstance(end, Exception):
                status, why = 3, f"the input could not be read ({end})"
                break
            if ckpt is not None and dirty and time.monotonic() - last_ckpt >= args.checkpoint_every:
                try:
                    ckpt.write(engine, base_lines + lines_done, base_events + events)
                except OSError as exc:  # the last checkpoint written stays valid: stop there
                    status, why = 4, f"the checkpoint could not be written ({exc.strerror or exc})"
                    break
                saved = base_lines + lines_done
                last_ckpt, dirty = time.monotonic(), False
                if run_stats is not None:
                    run_stats.checkpoint_time = time.time()
    finally:
        if args.output != "-":
            os.close(out_fd)
        if args.input != "-":
            src.close()
    covered = base_lines + lines_done
    if ckpt is not None and status != 4:
        try:
            ckpt.write(engine, covered, base_events + events)
            saved = covered
        except OSError as exc:
            status, why = 4, f"the checkpoint could not be written ({exc.strerror or exc})"
    if ckpt is not None and status == 4:
        state = f"{ckpt.path} still holds the previous checkpoint, which covers input lines " \
            f"1-{saved}" if ckpt.path.exists() else f"no checkpoint was written to {ckpt.path}"
        print(f"streamgru run: stopped: {why}; {state}: continue the input at line {saved + 1}",
              file=err)
    elif ckpt is not None:
        print(f"streamgru run: checkpoint {ckpt.path}: input lines 1-{covered}, "
              f"{base_events + events} events, {len(engine)} streams", file=err)
    if why is not None and status != 4:
        print(f"streamgru run: stopped: {why}; the input from line {covered + 1} on was not "
              f"processed" + (f": continue it at line {covered + 1}" if ckpt else ""), file=err)
    if skipped:
        print(f"streamgru run: {skipped} malformed line(s) skipped", file=err)
    if with_missing:
        print(f"streamgru run: {with_missing} event(s) with missing values stepped by --missing "
              f"{args.missing}", file=err)
    if refused_lines:
        print(f"streamgru run: {refused_lines} line(s) refused by the engine skipped", file=err)
    if stop:
        return 128 + stop[0]
    return status


def _write(fd, keys, y, fmt32):
    """Write one JSON line per output row to ``fd``, all of them or raise ``_OutputError``.

    ``y`` must be finite: JSON has no NaN or infinity, and the engine refuses steps that would
    produce them, so a non-finite value here is a bug, refused before anything is written. When
    ``fd`` is a regular file, a failed write is truncated away, so the file ends with the last
    batch written whole.
    """
    if not np.isfinite(y).all():
        bad = int(np.flatnonzero(~np.isfinite(y).all(axis=1))[0])
        raise _NonFiniteOutput(f"internal error: the engine returned a non-finite output for key "
                               f"{keys[bad]!r} (a bug; nothing was written for this batch)")
    spec = "%.9g" if fmt32 else "%.17g"
    parts = []
    for key, row in zip(keys, y.tolist()):
        vals = ",".join(spec % v for v in row)
        parts.append(f'{{"key": {json.dumps(key)}, "y": [{vals}]}}\n')
    data = memoryview("".join(parts).encode())
    size = None
    try:
        st = os.fstat(fd)
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        while data:
            data = data[os.write(fd, data):]
    except OSError as exc:
        if size is not None:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
        what = "the reader of the output is gone" if isinstance(exc, BrokenPipeError) else \
            f"the output could not be written ({exc.strerror or exc})"
        raise _OutputError(what) from None
