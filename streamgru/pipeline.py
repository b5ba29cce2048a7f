"""``streamgru run MODEL``: the engine in a shell pipeline.

Events come in on stdin (or ``--input FILE``), one per line, and for every event one line goes
out, in input order::

    {"key": "sensor-17", "x": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}    ->  {"key": "sensor-17", "y": [...]}

``--format csv`` reads ``key,x1,...,xI`` rows instead (keys are then strings; a first line whose
first field is ``key`` is a header and skipped). JSON keys are strings or integers, one kind per
run (the first event decides, or the restored checkpoint); fields other than ``key`` and ``x``
are ignored. Outputs are float32 values printed with 9 significant digits (float32 round-trips
exactly), or 17 with ``--dtype float64``.

Micro-batches: lines are gathered until ``--max-batch`` events are waiting or ``--max-wait-ms``
has passed since the first of them arrived, then stepped in one ``Engine.step`` call. A stream
that appears several times in a batch is stepped once per event, in order, as if the events had
come one by one.

Malformed lines (not JSON or CSV, a missing key, a key of the other kind, ``x`` of the wrong
width, non-numeric or non-finite values) are reported on stderr with their line number and
skipped; nothing else is lost or reordered. With ``--strict`` the first one stops the run (exit
status 1) after the events before it have been processed and checkpointed.

Checkpoints (``--state FILE``)
------------------------------
At start, FILE (if it exists) restores every stream. Then the states are written to FILE every
``--checkpoint-every`` seconds (when something changed), at the end of the input, and on SIGTERM
or SIGINT (the batch in hand is finished first; exit status 128 + signal number). Each write is
atomic (``Engine.save_state``: temp file, fsync, rename), so a crash, even ``kill -9``, leaves the
previous checkpoint or the new one, never a torn file.

Beside FILE, ``FILE.json`` records how much input the checkpoint covers: ``input_lines`` (every
line up to and including the last one whose event is in the states, counting blank and
malformed lines) and ``events``, tied to FILE by its SHA-256. Line numbers count from the start
of the logical input across restarts: after a restore, the first line read is line
``input_lines + 1``. At start the command says on stderr which line to continue from. Events
after the last checkpoint are not in the restored states: to continue every stream exactly,
feed the input again from that line (e.g. ``tail -n +$((L + 1)) events.jsonl``); their outputs
are then written a second time (at-least-once output, exactly-once state).

Exit status: 0 at the end of the input, 1 on a malformed line with ``--strict``, 2 on a usage
error (bad model file, bad option), 128 + N on signal N.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

__all__ = ["add_arguments", "main", "parse_line"]

_EOF = object()


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
    p.add_argument("--threads", type=int, default=None, help="Numba threads for large batches")


def parse_line(text, fmt, input_size, key_kind=None):
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

    Returns
    -------
    (int or str, list of float)

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
    """
    if fmt == "csv":
        try:
            fields = next(csv.reader([text]))
        except (csv.Error, StopIteration) as exc:
            raise ValueError(f"expected a CSV row key,x1,...,x{input_size}, got {exc}") from None
        if len(fields) != input_size + 1:
            raise ValueError(f"expected {input_size + 1} CSV fields (key + input_size "
                             f"{input_size} values), got {len(fields)}")
        key, raw = fields[0], fields[1:]
        try:
            x = [float(v) for v in raw]
        except ValueError:
            bad = next(v for v in raw if not _is_float(v))
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
        bad = [v for v in raw if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise ValueError(f"x: expected numbers, got {json.dumps(bad[0])}")
        x = [float(v) for v in raw]
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ValueError(f"key: expected a string or an integer, got {json.dumps(key)}")
        if isinstance(key, int) and not -(2**63) <= key < 2**63:
            raise ValueError(f"key: expected an integer within int64, got {key}")
    if len(x) != input_size:
        raise ValueError(f"x: expected {input_size} numbers (the model's input_size), got {len(x)}")
    bad = [i for i, v in enumerate(x) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"x: expected finite numbers, got {x[bad[0]]} at index {bad[0]}")
    if isinstance(key, str):
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"key: expected a string encodable as UTF-8, got {key!r}") from None
    if key_kind is not None and type(key) is not key_kind:
        kind = "an int" if key_kind is int else "a str"
        raise ValueError(f"key: expected {kind} key like this run's others (one kind per run), "
                         f"got {json.dumps(key)}")
    return key, x


def _is_float(v):
    try:
        float(v)
        return True
    except ValueError:
        return False


class _Checkpoint:
    """The state file plus its ``.json`` sidecar (input lines and events it covers)."""

    def __init__(self, path):
        self.path = Path(path)
        self.meta = Path(str(path) + ".json")

    def restore(self, engine):
        """Load the states; return (input_lines, events) covered, or (None, None) if unknown."""
        if not self.path.exists():
            return 0, 0
        engine.load_state(self.path)
        try:
            meta = json.loads(self.meta.read_text())
            if meta.get("state_sha256") == _sha256(self.path):
                return int(meta["input_lines"]), int(meta["events"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None, None

    def write(self, engine, lines, events):
        from .formats import write_atomic

        engine.save_state(self.path)
        meta = {"format": "streamgru-run-checkpoint", "version": 1, "input_lines": lines,
                "events": events, "streams": len(engine), "state_sha256": _sha256(self.path),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_atomic(self.meta, (json.dumps(meta, indent=1) + "\n").encode())


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _reader(stream, q):
    try:
        for i, raw in enumerate(stream, 1):
            q.put((i, raw))
    except Exception as exc:  # noqa: BLE001 - handed to the main thread, which reports it
        q.put(exc)
    q.put(_EOF)


def _next_batch(q, max_batch, wait_s):
    """Up to ``max_batch`` lines; waits at most ``wait_s`` after the first. (items, at_eof)."""
    items = []
    try:
        item = q.get(timeout=0.1)  # wake up regularly for checkpoints and signals
    except queue.Empty:
        return items, False
    deadline = time.monotonic() + wait_s
    while True:
        if item is _EOF:
            return items, True
        if isinstance(item, Exception):
            raise item
        items.append(item)
        if len(items) >= max_batch:
            return items, False
        try:
            item = q.get_nowait()
        except queue.Empty:
            left = deadline - time.monotonic()
            if left <= 0:
                return items, False
            try:
                item = q.get(timeout=left)
            except queue.Empty:
                return items, False


def main(args):
    """Run the ``streamgru run`` verb (argparse namespace from :func:`add_arguments`)."""
    import numpy as np

    from .engine import Engine
    from .formats import load

    if args.max_batch < 1:
        raise ValueError(f"--max-batch: expected a positive int, got {args.max_batch}")
    if not args.max_wait_ms >= 0:
        raise ValueError(f"--max-wait-ms: expected a number >= 0, got {args.max_wait_ms}")
    if not args.checkpoint_every > 0:
        raise ValueError(f"--checkpoint-every: expected seconds > 0, got {args.checkpoint_every}")
    model = load(args.model)
    engine = Engine(model, dtype=args.dtype, threads=args.threads)
    err = sys.stderr
    ckpt = _Checkpoint(args.state) if args.state else None
    base_lines = base_events = 0
    if ckpt is not None:
        existed = ckpt.path.exists()
        lines, events = ckpt.restore(engine)
        if lines is None:
            print(f"streamgru run: restored {len(engine)} streams from {ckpt.path}, but "
                  f"{ckpt.meta} is missing or belongs to another write: which input lines the "
                  f"checkpoint covers is unknown; line numbers below start at 1", file=err)
        elif existed:
            base_lines, base_events = lines, events
            print(f"streamgru run: restored {len(engine)} streams from {ckpt.path}: the "
                  f"checkpoint covers input lines 1-{lines} ({events} events); continue the "
                  f"input at line {lines + 1}", file=err)
    keys_now = engine.keys()
    key_kind = type(keys_now[0]) if keys_now else None
    if args.format == "csv" and key_kind is int:
        raise ValueError(f"--format csv: expected a checkpoint with string keys (CSV keys are "
                         f"strings), got one with integer keys from {args.state}")

    src = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
    out = sys.stdout.buffer if args.output == "-" else open(args.output, "ab")  # noqa: SIM115
    q = queue.Queue(maxsize=64 * args.max_batch)
    threading.Thread(target=_reader, args=(src, q), daemon=True, name="streamgru-reader").start()

    stop = []
    previous = {}

    def on_signal(signum, frame):
        stop.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: no signal handling
            pass

    fmt32 = args.dtype == "float32"
    n_in = model.input_size
    lines_done = events = skipped = 0
    header_seen = args.format != "csv"
    last_ckpt, dirty, status = time.monotonic(), False, 0
    try:
        at_eof = False
        while not at_eof and not stop:
            items, at_eof = _next_batch(q, args.max_batch, args.max_wait_ms / 1000.0)
            keys, rows, last_line, failed = [], [], None, False
            for i, raw in items:
                line_no = base_lines + i
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if not text.strip():
                    last_line = i
                    continue
                if not header_seen:
                    header_seen = True
                    if text.split(",", 1)[0].strip().strip('"').lower() == "key":
                        last_line = i
                        continue
                try:
                    key, x = parse_line(text, args.format, n_in, key_kind)
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
                last_line = i
            if keys:
                y = engine.step(keys, np.asarray(rows, dtype=engine.dtype))
                _write(out, keys, y, fmt32)
                events += len(keys)
            if last_line is not None:
                lines_done = last_line
                dirty = True
            if failed:
                status = 1
                break
            if ckpt is not None and dirty and time.monotonic() - last_ckpt >= args.checkpoint_every:
                ckpt.write(engine, base_lines + lines_done, base_events + events)
                last_ckpt, dirty = time.monotonic(), False
    except BrokenPipeError:
        # The reader of our output is gone (e.g. `| head`): stop quietly, checkpoint below.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ckpt is not None:
            ckpt.write(engine, base_lines + lines_done, base_events + events)
            print(f"streamgru run: checkpoint {ckpt.path}: input lines 1-{base_lines + lines_done}, "
                  f"{base_events + events} events, {len(engine)} streams", file=err)
        if skipped:
            print(f"streamgru run: {skipped} malformed line(s) skipped", file=err)
        if args.output != "-":
            out.close()
        if args.input != "-":
            src.close()
    if stop:
        return 128 + stop[0]
    return status


def _write(out, keys, y, fmt32):
    spec = "%.9g" if fmt32 else "%.17g"
    parts = []
    for key, row in zip(keys, y.tolist()):
        vals = ",".join(spec % v for v in row)
        parts.append(f'{{"key": {json.dumps(key)}, "y": [{vals}]}}\n')
    out.write("".join(parts).encode())
    out.flush()
