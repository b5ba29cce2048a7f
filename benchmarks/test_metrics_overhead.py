"""What Engine.stats()'s counters cost on the hot path: the one-event step, n=1, I=16, H=64.

Two contenders in one group, the same model, engine settings and call:

* ``stats on``: ``streamgru.Engine`` as shipped (imported from a copy, ``streamgru_metrics``).
* ``stats off``: the same engine.py with the metric statements of ``step`` and ``run`` removed
  (the step countdown, the lines that bump the ``self._m`` counters or read the clock for them),
  imported from a copy of the package named ``streamgru_nometrics``. It is built from the current
  source on every run, so it stays "the same hot path minus the counters" as the engine changes.
  The one-event path takes its alternating weight direction from the countdown's parity; without
  the countdown it alternates the engine's own ``_flip`` instead, as it would without metrics.
Both copies live in temp directories named by a hash of the source; their kernels compile once
per source version.

Run: ``pytest benchmarks/test_metrics_overhead.py --benchmark-only`` and compare the medians
(target: at most 3% apart). Timings are never asserted. On a shared, noisy machine the two
sequential runs drift apart by more than the difference sought: ``python
benchmarks/test_metrics_overhead.py [rounds] [--cpu]`` alternates the two in short rounds instead
and prints the median per-call time of each and the median of the per-round ratios. ``--cpu``
times each round by the thread's CPU time (``time.thread_time``) instead of the wall clock: on a
machine shared with other jobs, the time the process waits for a core then stays out of the
rounds (the caches other jobs leave behind still count). ``--bytecodes`` counts instead the
Python bytecodes one call executes, with and without stats: no timing, so no noise, but it sees
only the interpreter's share of the difference (not, say, the int objects a counter allocates).
"""

import hashlib
import importlib
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pytest

import streamgru
from streamgru.harness.bench import machine_info

SRC = pathlib.Path(streamgru.__file__).parent
# A metric statement of step/run: the step countdown, a counter bump, the clock read for the
# sampled timing, the "if t0:" guarding a timed record (its body is itself a counter line).
METRIC_LINE = re.compile(r"^\s*(c = self\._tick = |t0 = |self\._m[._]\w+|if t0:$)")
# The one-event kernel's last argument, its weight direction: the countdown's parity.
FLIP_ARG = ", c & 1)"


def strip_metrics(source):
    """``engine.py`` source without the metric statements of ``step`` and ``run``, nor the
    counters' attributes (``__init__``'s ``self._metrics_init()``); the one-event path alternates
    ``self._flip`` (``self._flip ^= 1`` before its kernel's arguments) instead of using the
    countdown's parity."""
    lines = source.splitlines(keepends=True)
    out, inside, removed, flips = [], False, 0, 0
    for line in lines:
        if line.startswith("    def "):
            inside = line.startswith(("    def step(", "    def run("))
        if line.strip() == "self._metrics_init()" or (
                inside and METRIC_LINE.match(line.rstrip("\n"))):
            removed += 1
            continue
        if inside and FLIP_ARG in line:
            start = max(i for i, prev in enumerate(out) if prev.lstrip().startswith("args = ("))
            indent = out[start][:len(out[start]) - len(out[start].lstrip())]
            out.insert(start, f"{indent}self._flip ^= 1\n")
            line = line.replace(FLIP_ARG, ", self._flip)")
            flips += 1
        out.append(line)
    if removed < 8 or flips != 1:
        raise RuntimeError(f"expected the metric statements of step and run and one kernel call "
                           f"taking the countdown's parity, removed {removed} lines and found "
                           f"{flips} such calls: update METRIC_LINE or FLIP_ARG")
    return "".join(out)


def build_copy(strip):
    """This source tree imported as a separate package: ``streamgru_metrics`` (as is) or, with
    ``strip``, ``streamgru_nometrics`` (counters stripped). Both contenders are such copies, so
    they differ in nothing but the counters (not in where their kernels were compiled and
    cached, say)."""
    if strip:
        return build_package("streamgru_nometrics", strip_metrics)
    return build_package("streamgru_metrics", None)


def build_package(name, transform):
    """This source tree imported as package ``name``, its engine.py passed through
    ``transform(source) -> source`` (None: as is)."""
    if name in sys.modules:
        return sys.modules[name]
    engine_src = (SRC / "engine.py").read_text()
    tag = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(SRC.glob("*.py")))).hexdigest()[:12]
    root = pathlib.Path(tempfile.gettempdir()) / f"streamgru-{name}-{tag}"
    pkg = root / name
    if not pkg.exists():
        tmp = root / "partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(SRC, tmp, ignore=shutil.ignore_patterns("__pycache__"))
        if transform is not None:
            (tmp / "engine.py").write_text(transform(engine_src))
        tmp.rename(pkg)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(root))


def make_engine(pkg):
    """A warmed one-stream engine of ``pkg``, its key list and input row."""
    model = pkg.GRUModel.random(16, 64, seed=0)
    engine = pkg.Engine(model, threads=1)
    x = np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)
    keys = ["a"]
    for _ in range(100):  # open the stream, compile and warm up outside the timing
        engine.step(keys, x)
    return engine, keys, x


@pytest.mark.parametrize("variant", ["stats on", "stats off"])
def test_one_event_step(benchmark, variant):
    engine, keys, x = make_engine(build_copy(strip=variant == "stats off"))
    benchmark.group = "metrics overhead: one-event step, I=16 H=64, 1 thread"
    info = machine_info()
    benchmark.extra_info.update({k: info[k] for k in ("cpu", "cores", "numba", "numpy")})
    benchmark.extra_info.update(variant=variant, threads=1)
    y = benchmark(engine.step, keys, x)
    assert y.shape == (1, engine.model.output_size) and np.isfinite(y).all()


def rotating_rounds(engines, rounds, calls, clock=time.perf_counter):
    """Time ``calls`` steps of each ``(engine, keys, x)`` in turn for ``rounds`` rounds, the
    order rotating by one engine per round (no engine always runs first, after a cold cache).
    ``clock``: seconds, ``time.perf_counter`` (wall) or ``time.thread_time`` (CPU).
    Returns one list per engine of its per-round us per call."""
    per = [[] for _ in engines]
    for r in range(rounds):
        shift = r % len(engines)
        for j in list(range(shift, len(engines))) + list(range(shift)):
            engine, keys, x = engines[j]
            step = engine.step
            t = clock()
            for _ in range(calls):
                step(keys, x)
            per[j].append((clock() - t) / calls * 1e6)
    return per


def interleaved(rounds=1000, calls=500, copies=4, clock=time.perf_counter):
    """Alternate ``calls`` one-event steps of ``2 * copies`` engines for ``rounds`` rounds
    (rotating their order): ``copies`` with stats and ``copies`` without. Several of each,
    because two identical engines can differ by a few percent (where their arrays landed); the
    A/A control compares the first half of the engines without stats with the second half.
    ``clock`` as in :func:`rotating_rounds`. Returns the median us per call with and without
    stats, and the median per-round ratios (all with) / (all without) and (second half without)
    / (first half without)."""
    on, off = build_copy(strip=False), build_copy(strip=True)
    engines = [make_engine(on) for _ in range(copies)] + [make_engine(off) for _ in range(copies)]
    per = rotating_rounds(engines, rounds, calls, clock)
    med = statistics.median
    rows = list(zip(*per))  # per round: one time per engine
    half = copies // 2
    ratio = {"on/off": med(sum(t[:copies]) / sum(t[copies:]) for t in rows),
             "A/A": med(sum(t[copies + half:]) / sum(t[copies:copies + half]) for t in rows)}
    times = {"on": med(med(p) for p in per[:copies]), "off": med(med(p) for p in per[copies:])}
    return times, ratio


def bytecodes_per_call(calls=320):
    """Python bytecodes executed per one-event step, ``{"on": n, "off": n}``, averaged over
    ``calls`` calls (a multiple of the timing sample, so the timed calls weigh in as they do)."""
    counts = {}
    for variant, strip in (("on", False), ("off", True)):
        engine, keys, x = make_engine(build_copy(strip))
        n = 0

        def trace(frame, event, arg):
            nonlocal n
            frame.f_trace_opcodes = True
            n += event == "opcode"
            return trace

        sys.settrace(trace)
        try:
            for _ in range(calls):
                engine.step(keys, x)
        finally:
            sys.settrace(None)
        counts[variant] = n / calls
    return counts


if __name__ == "__main__":
    if "--bytecodes" in sys.argv[1:]:
        counts = bytecodes_per_call()
        print(f"one-event step, I=16 H=64: Python bytecodes per call, stats on {counts['on']:.2f}, "
              f"off {counts['off']:.2f} (+{counts['on'] - counts['off']:.2f})")
        sys.exit()
    cpu = "--cpu" in sys.argv[1:]
    args = [a for a in sys.argv[1:] if a != "--cpu"]
    n = int(args[0]) if args else 1000
    times, ratio = interleaved(n, clock=time.thread_time if cpu else time.perf_counter)
    print(f"one-event step, I=16 H=64, 1 thread, {n} rotating rounds of 500 calls, 4 engines "
          f"each, {'thread CPU' if cpu else 'wall'} time; median us per call: stats on "
          f"{times['on']:.3f}, off {times['off']:.3f}; median "
          f"per-round ratio on/off {ratio['on/off']:.4f} ({(ratio['on/off'] - 1) * 100:+.1f}%), "
          f"A/A control {ratio['A/A']:.4f} ({(ratio['A/A'] - 1) * 100:+.1f}%)")
