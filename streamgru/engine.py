"""Engine: many streams, one model, every stream's hidden state kept between calls.

State policy (what each verb does to a stream's state)
------------------------------------------------------
* ``step(keys, x)``: each listed stream advances one step; an unknown key is opened with a zero
  state first. A key listed k times is advanced k times, in batch order, exactly as if its rows
  came in k separate calls. Streams not listed are untouched.
* ``run(key, xs)``: one stream advances ``len(xs)`` steps (opened with zeros if unknown).
* ``open(key, state=None)``: a new stream, zero state or the given one; refuses an open key.
* ``reset(key)``: back to zeros. ``close(key)``: forgotten; its slot is reused.
* ``state(key)``: a copy. ``set_state(key, state)``: overwrite (opens the key if unknown).
* ``save_state(path)`` / ``load_state(path)``: every stream, atomically, tied to this model.
* A call that raises changes nothing: no state, no opened key, whatever the exception
  (``MemoryError`` and ``KeyboardInterrupt`` included): buffers are allocated before keys open.
* No verb writes NaN/inf into a state. ``step``/``run`` refuse non-finite input (unless
  ``check_finite=False``) and, always, a step whose new state or output would be NaN/inf (an
  overflow): ``NonFiniteError`` (a ValueError) whose ``keys`` lists the streams concerned, with
  every state as it was; drop those rows and call again. ``set_state``/``open`` refuse a
  non-finite state; ``save_state`` refuses to write one; ``load_state`` refuses a snapshot holding
  one, naming the keys, or with ``skip_nonfinite=True`` loads the other streams.
* Missing values (``Engine(missing=...)``): a NaN in ``step``/``run`` input marks a missing value
  (+-inf never does: it is refused as above, naming the keys). ``"refuse"`` (default): refused as
  above. ``"skip"``: a row with any NaN leaves its stream's state unchanged and outputs the model's
  output for the held state (the layers after the last recurrent layer applied to that layer's
  held h).
  ``"zero"``: each NaN is read as 0. ``"last"``: each NaN is read as the stream's last observed
  value of that feature (0 if never observed); every observed value updates that memory, which
  belongs to the stream: ``reset``/``close`` clear it, eviction drops it, ``open``/a new key
  starts it at 0, ``set_state`` leaves it, ``save_state``/``load_state`` carry it,
  ``last_observed(key)`` reads it. Repeated keys in one call apply the rule row by row, in order.
* Str keys holding NUL (``"\x00"``) are refused: numpy str arrays drop trailing NULs, so
  ``"a\x00"`` and ``"a"`` could not be told apart.

Lifecycle (``max_streams``, ``idle_timeout``, ``on_evict``; details in docs/operations.md): a
stream is *used* by ``step``, ``run``, ``open``, ``set_state`` and ``reset`` (reads -- ``state``,
``in``, ``keys``, ``save_state`` -- do not count). Before a mutating verb does anything else, streams
unused for ``idle_timeout`` seconds are evicted; then, if the call's new keys would exceed
``max_streams``, the least recently used streams not named in the call are evicted. Each evicted
stream's final state goes to ``on_evict(key, state)``. A call naming more distinct keys than
``max_streams`` is refused before anything changes. If ``on_evict`` raises, that stream stays open
and unchanged, the exception propagates and the call does nothing more.

Threading: every verb holds the engine's lock, so calls from several threads are serialized
(each call sees the state left by the previous one; no torn states). The kernels release the GIL,
so other Python threads, and other engines, run meanwhile. A single call uses up to ``threads``
Numba threads for large batches.
"""

from __future__ import annotations

import math
import os
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass

import numba
import numpy as np

from . import kernels as K
from .errors import FormatError, NonFiniteError, UnsupportedModelError
from .layers import LAYER_KINDS
from .model import GRUModel
from .packing import aligned_zeros, pack, weights_form
from .state import StateStore, normalize_key, normalize_keys

__all__ = ["Engine", "LoadedState", "MISSING_POLICIES", "check_missing", "check_runnable"]

# The thread-count pair an engine's parallel calls use (Engine._parallel), set by
# _thread_count_accessors when the first engine is made, and the names it looks for.
_get_num_threads = _set_num_threads = None
_ACCESSORS = ("_get_num_threads", "_set_num_threads")


def _thread_count_accessors():
    """Set ``_get_num_threads`` / ``_set_num_threads``, once: the thread-local accessors that
    numba.get/set_num_threads end in, or the public pair if this Numba has none.

    The public pair validates and checks the thread pool on every call (0.8 and 1.1 us on a Zen 4
    guest); the accessors cost 0.16 and 0.37 us. They are ctypes functions that
    ``numba.np.ufunc.parallel`` binds to module globals only when it launches the pool, so they
    are looked up after launching it: imported with the module, before any pool, they did not
    exist, and every engine used the public pair. The engine's thread count is validated at
    construction (1..NUMBA_NUM_THREADS), which is all the public setter checks besides."""
    global _get_num_threads, _set_num_threads
    if _get_num_threads is not None:
        return
    numba.get_num_threads()  # launches the pool, which binds the accessors
    from numba.np.ufunc import parallel

    get, put = (getattr(parallel, name, None) for name in _ACCESSORS)
    if not (callable(get) and callable(put)):
        get, put = numba.get_num_threads, numba.set_num_threads
    _get_num_threads, _set_num_threads = get, put



def _compiled(kernel, args):
    """The compiled entry point of Numba dispatcher ``kernel`` for exactly the types of ``args``
    (which it has already been called with), or ``kernel`` itself if there is none.

    A dispatcher call resolves the type of every argument first (~0.4 us for the 10-argument
    one-event kernels, ~15% of a small step); the entry point only converts them. Callers use
    it only where every argument's type is fixed: engine-owned arrays, and an input whose
    dtype, shape, contiguity, alignment and writability were checked. ``entry_point`` is an
    attribute of Numba's compile result, not public API: without it, the dispatcher is used.
    """
    try:
        key = tuple(numba.typeof(a) for a in args)
        return kernel.overloads[key].entry_point
    except Exception:  # NUMBA_DISABLE_JIT (plain functions), or a future Numba
        return kernel


# Below this many rows a parallel region costs more than it saves (PERF_NOTES: entering one costs
# ~1-2 us, a small-batch step a few us).
PARALLEL_MIN_ROWS = 64
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
# Below PARALLEL_MIN_ROWS, a step with at least this many multiply-adds (rows x weights) is spread
# over threads by weight panels: ~20 us of arithmetic on one core (weights of 1.4 MB and more, past
# one core's 1 MiB L2: two cores hold them in their two L2s), against ~2 us per parallel region.
WIDE_MIN_MACS = 350_000
# run() on more than one thread takes the sequence kernel spread over threads
# (run_sequence_wide), which spreads each layer's input projection over the T steps and shares
# each step's recurrent product as the layer's size makes worth it (a team for the whole
# sequence, a parallel region per step, or none: kernels.RUN_TEAM_MIN_MACS, RUN_WIDE_MIN_MACS),
# when a layer's recurrent product is large (RUN_WIDE_MIN_MACS) or the sequence holds
# RUN_SPLIT_MIN_MACS multiply-adds that the kernel spreads (T x kernels.run_split_macs: the
# input side, and the recurrent products it shares; not the ones the calling thread computes
# either way). Measured with T=100 on 2 threads (znver4), the spread kernel against the serial
# one: 0.41M spread multiply-adds (LSTM I=16 H=64) 3% slower, 0.6-1.2M within 4% either way,
# 1.6M 3-5% faster, 3.3M 8-11% faster. Below, the parallel region and the second thread's
# wake-up cost what the split saves, and a busy second core makes it slower still.
RUN_WIDE_MIN_MACS = K.RUN_WIDE_MIN_MACS
RUN_SPLIT_MIN_MACS = 1_500_000
# From this many rows, an int key array is mapped to slots by a compiled table (state.IntSlotTable)
# rather than one dict lookup per key.
INT_TABLE_MIN_ROWS = 64
_DTYPES = {"float32": np.float32, "float64": np.float64}

# Metrics (Engine.stats). Every counter is a plain int, changed under the lock the verb already
# holds. A clock pair and a histogram update cost several percent of a one-event step, so step
# calls are timed in a systematic sample: the calls whose number is a multiple of
# STEP_TIMING_EVERY (fewer samples would cost less, more would cost more:
# benchmarks/test_metrics_overhead.py). run() is timed on every call.
# A step call's one metric statement on the one-event path is a countdown to its next timed call,
# an int attribute of the engine itself (Engine._tick), which also counts the calls: step calls =
# completed countdowns x STEP_TIMING_EVERY + the current one's progress. Why not a counter: a
# counter on the counters object costs one more attribute load and store, and counting up
# allocates a new int object per call past 256, while the countdown stays among CPython's cached
# small ints. The one-event path also takes its alternating weight direction from the
# countdown's parity (even: the parity alternates across the restart too).
STEP_TIMING_EVERY = 32
# Histogram upper bounds (inclusive, as Prometheus' "le"); a last, unbounded bucket follows.
ROWS_BOUNDS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
SECONDS_BOUNDS = (2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0)
_NS_BOUNDS = tuple(round(b * 1e9) for b in SECONDS_BOUNDS)
_ns = time.perf_counter_ns
MISSING_POLICIES = ("refuse", "skip", "zero", "last")
_COUNTED_VERBS = ("run", "open", "reset", "close", "state", "set_state", "last_observed",
                  "set_last_observed", "save_state", "load_state", "evict_idle")


class _Counters:
    """Engine.stats()'s counters (plain ints and lists, changed under the engine's lock)."""

    __slots__ = ("step", "general", "fast_refused", "calls", "rows_counts", "rows_sum",
                 "rows_refused", "step_seconds", "run_seconds", "opened", "closed",
                 "evicted_idle", "evicted_capacity", "snapshots", "snapshot_bytes", "snapshot_ns",
                 "missing_values", "missing_rows")

    def __init__(self):
        self.step = 0  # step calls started, of completed countdowns (Engine._tick has the rest)
        self.general = 0  # step calls that took the general path
        self.fast_refused = 0  # one-event fast-path calls refused by the kernel
        self.calls = dict.fromkeys(_COUNTED_VERBS, 0)
        # [step, run]: rows per call (bucket counts), rows stepped, rows refused
        self.rows_counts = [[0] * (len(ROWS_BOUNDS) + 1) for _ in range(2)]
        self.rows_sum = [0, 0]
        self.rows_refused = [0, 0]
        # duration histograms: bucket counts, then the sum in ns as the last item
        self.step_seconds = [0] * (len(SECONDS_BOUNDS) + 2)
        self.run_seconds = [0] * (len(SECONDS_BOUNDS) + 2)
        self.opened = self.closed = 0
        self.evicted_idle = self.evicted_capacity = 0
        self.snapshots = self.snapshot_bytes = self.snapshot_ns = 0
        # missing input values handled by the policy (NaN values, and the rows holding them)
        self.missing_values = self.missing_rows = 0


@dataclass(frozen=True)
class LoadedState:
    """What :meth:`Engine.load_state` read besides the states.

    Attributes
    ----------
    metadata : dict or None
        The ``metadata`` the snapshot was saved with (``Engine.save_state(path, metadata=...)``).
    skipped : list
        Keys whose saved state held NaN/inf and were left out (only with ``skip_nonfinite=True``).
    """

    metadata: dict | None
    skipped: list


class Engine:
    """Stateful multi-stream inference of a recurrent model (GRU, LSTM and Dense layers).

    Parameters
    ----------
    model : Model
        Read-only; its weights are cast once to ``dtype``. A stream's state is the recurrent
        layers' states in layer order (``model.state_slices``; an LSTM layer's h then its C).
        A model holding a layer kind the kernels do not run is refused:
        ``UnsupportedModelError`` naming the layer (:func:`check_runnable`).
    dtype : {"float32", "float64"}
        Arithmetic and state precision. Inputs of other float dtypes are converted on purpose.
    capacity : int
        Initial number of state slots; grows automatically (doubling) as streams are opened.
    threads : int, optional
        Cap on Numba threads used by one call (default: Numba's own setting).
    check_finite : bool
        Refuse NaN/inf inputs (default). ``False`` skips that scan only: a step that would write
        NaN/inf into a state or an output is refused either way (see the module docstring).
    max_streams : int, optional
        At most this many open streams: opening one more evicts the least recently used stream
        not named in the call. None (default): unbounded.
    idle_timeout : float, optional
        Streams not used for this many seconds are evicted, lazily at the start of each mutating
        call and on :meth:`evict_idle`. None (default): never.
    on_evict : callable, optional
        ``on_evict(key, state)`` receives each evicted stream's key and final state (a
        ``(state_size,)`` copy) so it can be persisted; without it evicted states are dropped. It
        runs under the engine's lock and must not call the engine's mutating verbs.
    clock : callable, optional
        Returns the time in seconds (default ``time.monotonic``); injectable for tests. It must
        never go backwards.
    missing : {"refuse", "skip", "zero", "last"}
        What a NaN in ``step``/``run`` input does (see the module docstring): refuse the call
        (default), skip the row (the stream does not advance), read it as 0, or read it as the
        stream's last observed value of that feature. Anything but "refuse" needs
        ``check_finite=True``: the finite scan is what finds a NaN, so calls without NaN cost
        what they cost under "refuse" ("last" adds one row copy per row, its memory update).
    weights : {None, "float32", "float16", "int8", "float64"}
        How the weight matrices are stored (:mod:`streamgru.compact`): ``"float16"`` or
        ``"int8"`` (symmetric, one scale per output row) keep them compactly for a float32
        engine, whose arithmetic, state and activations stay float32; biases and peepholes stay
        float32. Compact weights are an approximation of the model: measure it with
        ``converters.verify(model, source, weights=...)``. None (default): the model's own
        form (``model.stored_as`` for a model loaded from a compact file, else the compute
        dtype). :attr:`weights` says which is in use. Snapshots do not depend on it.

    Examples
    --------
    >>> import numpy as np
    >>> from streamgru import Engine, GRUModel
    >>> engine = Engine(GRUModel.random(3, 8, dense_after=[(2, "softmax")]))
    >>> y = engine.step(["a", "b", "a"], np.ones((3, 3), np.float32))  # "a" steps twice
    >>> y.shape, len(engine), engine.state("a").shape
    ((3, 2), 2, (8,))

    A bounded engine that hands evicted states to a store of your own:

    >>> saved = {}
    >>> engine = Engine(GRUModel.random(3, 8), max_streams=2, on_evict=saved.__setitem__)
    >>> _ = engine.step(["a", "b"], np.ones((2, 3)))
    >>> _ = engine.step(["c"], np.ones((1, 3)))  # "a" was used least recently: evicted
    >>> sorted(engine.keys()), list(saved)
    (['b', 'c'], ['a'])

    Missing values filled with each stream's last observation:

    >>> engine = Engine(GRUModel.random(2, 4), missing="last")
    >>> _ = engine.step(["a"], np.array([[1.0, 2.0]]))
    >>> _ = engine.step(["a"], np.array([[np.nan, 3.0]]))  # read as [1.0, 3.0]
    >>> engine.last_observed("a").tolist()
    [1.0, 3.0]
    """

    def __init__(self, model, dtype="float32", capacity=1024, threads=None, check_finite=True,
                 max_streams=None, idle_timeout=None, on_evict=None, clock=None, missing="refuse",
                 weights=None):
        if not isinstance(model, GRUModel):
            raise TypeError(f"model: expected a streamgru.GRUModel, got {type(model).__name__}")
        key = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype) if _is_dtype(dtype)
                                                           else None, "name", None)
        if key not in _DTYPES:
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity: expected a positive int, got {capacity!r}")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) \
                    or not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
                raise ValueError(
                    f"threads: expected an int from 1 to {numba.config.NUMBA_NUM_THREADS} "
                    f"(NUMBA_NUM_THREADS) or None, got {threads!r}"
                )
            threads = int(threads)
        if max_streams is not None:
            if isinstance(max_streams, bool) or not isinstance(max_streams, (int, np.integer)) \
                    or max_streams < 1:
                raise ValueError(f"max_streams: expected a positive int or None, got {max_streams!r}")
            max_streams = int(max_streams)
            capacity = min(int(capacity), max_streams)  # more rows would never be used
        if idle_timeout is not None:
            if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float, np.integer,
                                                                               np.floating)):
                raise TypeError(f"idle_timeout: expected seconds (a positive float) or None, got "
                                f"{type(idle_timeout).__name__}")
            if not (idle_timeout > 0 and math.isfinite(idle_timeout)):
                raise ValueError(f"idle_timeout: expected a positive finite number of seconds or None, "
                                 f"got {idle_timeout!r}")
            idle_timeout = float(idle_timeout)
        if on_evict is not None and not callable(on_evict):
            raise TypeError(f"on_evict: expected a callable on_evict(key, state) or None, got "
                            f"{type(on_evict).__name__}")
        if on_evict is not None and max_streams is None and idle_timeout is None:
            raise ValueError("on_evict: expected max_streams or idle_timeout to be set too, got "
                             "neither (nothing would ever be evicted)")
        check_missing(missing, check_finite)
        check_runnable(model)  # before pack(), which would not know the layer
        if clock is None:
            clock = time.monotonic
        elif not callable(clock):
            raise TypeError(f"clock: expected a callable returning seconds, got {type(clock).__name__}")
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.on_evict = on_evict
        self._clock = clock
        # Recency is tracked only when something can be evicted: otherwise a call pays one check.
        self._track = max_streams is not None or idle_timeout is not None
        self._now = 0.0
        self._idle_due = math.inf  # no stream can be idle before this time (a lower bound)
        self._in_callback = False
        self.model = model
        self.dtype = np.dtype(_DTYPES[key])
        self.threads = threads
        self._par_threads = threads if threads is not None else numba.config.NUMBA_NUM_THREADS
        self.check_finite = bool(check_finite)
        self._packed = pack(model, self.dtype, weights_form(self.dtype, weights, model.stored_as))
        self._shape1 = (1, model.input_size)
        self._slot1 = np.zeros(1, np.int64)  # the one-event fast path's slots array
        self._flip = 0  # run()'s weight direction, alternated per call (step's: c & 1 in step)
        ks = self._packed.kernels  # this model's cell set's kernels
        self._run1, self._wide1 = ks.step_one, ks.step_wide  # the one-event path's kernels
        _thread_count_accessors()  # launches Numba's thread pool, then finds the accessors
        self._macs_per_row = sum(layer.macs for layer in model.layers)
        # run()'s kernel choice (_run_rows): the largest recurrent product, and the multiply-adds
        # per step the spread kernel shares out. One attribute: see test_metrics on the layout.
        self._run_macs = (max(layer.recurrent_macs for layer in model.recurrent_layers),
                          K.run_split_macs(self._packed.table, self.dtype.itemsize))
        self._store = StateStore(model.state_size, self.dtype, int(capacity), track=self._track,
                                 limit=max_streams, missing=missing,
                                 memory=model.input_size if missing == "last" else 0)
        self._lock = threading.RLock()
        self._n_out = model.output_size
        self._scratch = aligned_zeros((0, self._packed.scratch_width), self.dtype)  # sized below
        self._grow_scratch(1)
        self._run_scratch = aligned_zeros((2, self._packed.scratch_width), self.dtype)
        self._metrics_init()

    # ------------------------------------------------------------------------------------------
    # stepping

    def step(self, keys, x):
        """Advance each listed stream by one step.

        Parameters
        ----------
        keys : sequence of int or str, or 1-D integer array, length n
            Stream keys; unknown keys are opened with zero state. Repeated keys are stepped once
            per occurrence, in order.
        x : array_like, (n, input_size)
            One input row per key. Float arrays of another dtype, non-contiguous or read-only
            arrays are copied; integer, bool, object and string arrays are refused. A NaN is a
            missing value, handled by the engine's ``missing`` policy row by row in batch order
            (refused by default); +-inf is always refused.

        Returns
        -------
        numpy.ndarray, (n, output_size), the engine's dtype
            Row i is the output for keys[i] at this step.
        """
        with self._lock:
            c = self._tick = self._tick - 1  # metrics: calls left to the next timed one
            t0 = 0 if c else self._m_sample()
            # Fast path for the commonest real-time call, one event of an open stream with a
            # ready array: every check of the general path below, done inline, then the
            # one-stream kernel (no duplicate-key plan, one slot passed as an int). Anything
            # else, including every error, takes the general path.
            tkeys = type(keys)
            if (tkeys is list or (tkeys is np.ndarray and keys.ndim == 1)) and len(keys) == 1 \
                    and type(x) is np.ndarray:
                if tkeys is list:
                    k = keys[0]
                elif keys.dtype.kind == "i":
                    k = int(keys[0])  # what the general path's keys.tolist() gives
                else:
                    k = None
                tk = type(k)
                store = self._store
                if tk is store.key_kind and (tk is str or _I64_MIN <= k <= _I64_MAX):
                    slot = store.hot.get(k)  # a dict: int keys seen lately, every str key
                    if slot is None:
                        slot = store.slot_of.get(k)
                    xf = x.flags
                    if slot is not None and x.dtype == self.dtype and x.shape == self._shape1 \
                            and xf.c_contiguous and xf.writeable and xf.aligned \
                            and (not self._track or self._quiet()):
                        # Every argument's type is now fixed: the kernels are called through
                        # their compiled entry points once they exist (see _compiled).
                        out = np.empty((1, self._n_out), self.dtype)
                        p = self._packed
                        if self._par_threads == 1 or self._macs_per_row < WIDE_MIN_MACS:
                            # The weights' direction alternates from call to call (kernel
                            # doc): the parity of the metrics' countdown, which every step
                            # call changes, is that alternation at no further cost.
                            args = (p.params, p.table, p.fp, store.states, slot, x, out,
                                    self._run_scratch, self.check_finite, c & 1)
                            bad = self._run1(*args)
                            if self._run1 is p.kernels.step_one:
                                self._run1 = _compiled(self._run1, args)
                        else:  # large layers: split the weights over threads (see _kernel)
                            slot1 = self._slot1
                            slot1[0] = slot
                            args = (p.params, p.table, p.fp, store.states, slot1, x, out,
                                    self._scratch, self._iwork, store.mark, self.check_finite)
                            bad = self._parallel(self._wide1, args)
                            if self._wide1 is p.kernels.step_wide:
                                self._wide1 = _compiled(self._wide1, args)
                        if bad == -1:
                            if store.last is not None:  # missing="last": remember the values
                                store.last[slot] = x  # (1, I) into a row: no view of x[0] made
                            if self._track:  # an open key: no room to make, just mark it used
                                rec = store.recency
                                rec[k] = self._now
                                rec.move_to_end(k)
                            if t0:
                                self._m_timed(self._m.step_seconds, t0)
                            return out
                        if bad < 0 or store.missing == "refuse":
                            self._m.fast_refused += 1
                            self._refuse(bad, x, [k], None, "x")
                        # A NaN under a missing-value policy: the general path below handles it
                        # (the kernel changed nothing).
            self._m.general += 1  # the general path: counted here, its rows at its return
            store = self._store
            if tkeys is np.ndarray and keys.ndim == 1 and keys.dtype.kind in "iu" \
                    and len(keys) >= INT_TABLE_MIN_ROWS and not self._track \
                    and store.key_kind is not str:
                # A large batch of int keys: map them to slots in one kernel call; the key list
                # is only built on the error path.
                karr = self._int_keys(keys, "keys")
                n = len(karr)
                x = self._matrix(x, "x", n, "len(keys)")
                ks = None
            else:
                ks = self._keys_arg(keys, "keys")
                n = len(ks)
                x = self._matrix(x, "x", n, "len(keys)")
                if self._track:
                    self._admit(ks, x, "x")
            # Allocate first, then open keys: a MemoryError (or any exception) from here on
            # leaves no key half-opened.
            out = np.empty((n, self._n_out), self.dtype)
            if n == 0:
                self._m_stepped(0, 0, t0)
                return out
            if n > len(self._scratch):
                self._grow_scratch(n)
            slots, opened = store.slots_array(karr) if ks is None else store.slots(ks)
            try:
                bad = self._step_rows(slots, x, out)
                if bad != -1:
                    if ks is None:
                        ks = karr.tolist()
                    if bad >= 0 and store.missing != "refuse" and not np.isinf(x).any():
                        self._step_missing(ks, slots, x, out)
                    else:
                        self._refuse(bad, x, ks, self._iwork, "x")
                elif store.last is not None:  # missing="last": remember the values, in order
                    K.scatter_rows(store.last, slots, x)
            except BaseException:
                store.rollback(opened)
                raise
            if self._track:
                self._touch(ks)
            self._m_stepped(n, len(opened), t0)
            return out

    def _step_rows(self, slots, x, out):
        """One step kernel call for rows ``x`` (n, input_size) of state rows ``slots`` (n,),
        outputs into ``out`` (n, output_size); returns the kernel's code (see kernels)."""
        p = self._packed
        args = (p.params, p.table, p.fp, self._store.states, slots, x, out, self._scratch,
                self._iwork, self._store.mark, self.check_finite)
        kernel = self._kernel(len(slots))
        if kernel is p.kernels.step_parallel or kernel is p.kernels.step_wide:  # Numba threads
            return self._parallel(kernel, args)
        return kernel(*args)  # step_serial, or the one-event kernel for one row (_single)

    def _run_rows(self, slot, xs, out):
        """One sequence kernel call: stream ``slot`` over ``xs`` (T, input_size), outputs into
        ``out`` (T, output_size); returns the kernel's code."""
        p = self._packed
        args = (p.params, p.table, p.fp, self._store.states, slot, xs, out, self._run_scratch,
                self.check_finite)
        recurrent, split = self._run_macs
        if self._par_threads > 1 and (recurrent >= RUN_WIDE_MIN_MACS
                                      or len(xs) * split >= RUN_SPLIT_MIN_MACS):
            return self._parallel(p.kernels.run_sequence_wide, args + (self._par_threads,))
        self._flip ^= 1
        return p.kernels.run_sequence(*args, self._flip)

    # ------------------------------------------------------------------------------------------
    # missing input values (Engine(missing=...)): taken only by calls whose input holds NaN (the
    # kernels' finite scan refused it, having changed nothing), so clean calls never come here.

    def _step_missing(self, ks, slots, x, out):
        """Step rows ``x`` holding NaN (no inf) by the engine's policy. All or nothing: on any
        exception every state and memory row is as it was (the caller closes opened keys)."""
        store = self._store
        nan = np.isnan(x)
        skip = nan.any(axis=1)
        touched = np.unique(slots)
        backup = self._backup(touched)
        try:
            if store.missing == "skip":
                self._step_skip(ks, slots, x, out, skip)
            else:
                if store.missing == "zero":
                    filled = np.where(nan, x.dtype.type(0), x)
                else:
                    filled = self._fill_last(slots, x, nan)
                bad = self._step_rows(slots, filled, out)
                if bad != -1:
                    self._refuse(bad, filled, ks, self._iwork, "x")
                if store.last is not None:  # each row's filled values: its memory after it
                    K.scatter_rows(store.last, slots, filled)
        except BaseException:
            self._restore(touched, backup)
            raise
        self._m.missing_values += int(nan.sum())
        self._m.missing_rows += int(skip.sum())

    def _fill_last(self, slots, x, nan):
        """``x`` with each NaN replaced by its stream's last observed value; rows of a repeated
        key see the values observed by the earlier rows of that key in this call."""
        last = self._store.last
        if np.unique(slots).size == slots.size:
            return np.where(nan, last[slots], x)
        filled = x.copy()
        seen = {}  # slot -> the memory after this key's latest row so far (a row of filled)
        for i, s in enumerate(slots.tolist()):
            prev = seen.get(s)
            if prev is None:
                prev = last[s]
            row = filled[i]
            row[nan[i]] = prev[nan[i]]
            seen[s] = row
        return filled

    def _step_skip(self, ks, slots, x, out, skip):
        """The "skip" policy: rows with NaN keep their stream's state and output the tail of it.

        A skipped row's output is the held state *at its place in the batch*: a clean row of
        the same key earlier in the call has advanced it. The call is cut into chunks at each
        skipped row whose key already has a clean row in the current chunk; per chunk, skipped
        rows read the state before the chunk, then the clean rows step in one kernel call.
        """
        cuts, stepped = [], set()
        for i, (s, sk) in enumerate(zip(slots.tolist(), skip.tolist())):
            if not sk:
                stepped.add(s)
            elif s in stepped:
                cuts.append(i)
                stepped = set()  # row i starts the next chunk
        cuts.append(len(slots))
        start = 0
        for end in cuts:
            rows = np.arange(start, end)
            held, clean = rows[skip[start:end]], rows[~skip[start:end]]
            if held.size:
                out[held] = self._held_output(slots[held], [ks[i] for i in held])
            if clean.size:
                sub = np.empty((clean.size, out.shape[1]), out.dtype)
                bad = self._step_rows(slots[clean], x[clean], sub)
                if bad != -1:
                    self._refuse(bad, x[clean], [ks[i] for i in clean], self._iwork, "x",
                                 counted=len(slots))
                out[clean] = sub
            start = end

    def _backup(self, slots):
        """Copies of the states (and last observed values) of ``slots`` (distinct), for
        :meth:`_restore`: the missing-value paths change them in several steps."""
        store = self._store
        return store.states[slots], None if store.last is None else store.last[slots]

    def _restore(self, slots, backup):
        store = self._store
        store.states[slots] = backup[0]
        if backup[1] is not None:
            store.last[slots] = backup[1]

    def _held_output(self, slots, keys):
        """The model's output for the held states of ``slots``: the Dense layers after the last
        recurrent layer (packing's ``tail``) applied to that layer's h (``held_output_slice``),
        in the engine's dtype, with the kernels' activations. Refuses (NonFiniteError naming
        ``keys``) an output that overflows."""
        p = self._packed
        v = self._store.states[slots, self.model.held_output_slice]
        for layer, W, b in p.tail:
            with np.errstate(over="ignore", invalid="ignore"):  # checked below
                v = np.ascontiguousarray(v @ W.T + b)
            K.activate_rows(v, p.table, p.fp, layer)
        bad = ~np.isfinite(v).all(axis=1)
        if bad.any():
            self._m.rows_refused[0] += len(keys)
            names = list(dict.fromkeys(k for k, b in zip(keys, bad.tolist()) if b))
            raise NonFiniteError(
                f"x: expected inputs whose output stays finite, got a skipped row whose held "
                f"state's output would be NaN/inf (an overflow in {self.dtype.name}) for key(s) "
                f"{_key_list(names)}; no stream was changed", names)
        return v

    def _run_missing(self, slot, k, xs, out):
        """``run`` over ``xs`` holding NaN (no inf) by the engine's policy, in time order. All or
        nothing: on any exception the stream's state and memory are as they were."""
        store = self._store
        nan = np.isnan(xs)
        skip = nan.any(axis=1)
        one = np.array([slot])
        backup = self._backup(one)
        try:
            if store.missing == "skip":
                t, T = 0, len(xs)
                while t < T:
                    end = t + 1
                    while end < T and skip[end] == skip[t]:
                        end += 1
                    if skip[t]:  # the state is held over these steps: one output for all
                        out[t:end] = self._held_output(one, [k])[0]
                    else:
                        bad = self._run_rows(slot, xs[t:end], out[t:end])
                        if bad != -1:
                            self._refuse(bad, xs[t:end], [k], None, "xs", counted=T)
                    t = end
            else:
                if store.missing == "zero":
                    filled = np.where(nan, xs.dtype.type(0), xs)
                else:  # forward fill along time, from the memory
                    steps = np.where(nan, -1, np.arange(len(xs))[:, None])
                    np.maximum.accumulate(steps, axis=0, out=steps)
                    filled = np.where(steps >= 0,
                                      xs[np.maximum(steps, 0), np.arange(xs.shape[1])],
                                      store.last[slot])
                bad = self._run_rows(slot, filled, out)
                if bad != -1:
                    self._refuse(bad, filled, [k], None, "xs")
                if store.last is not None:
                    store.last[slot] = filled[-1]
        except BaseException:
            self._restore(one, backup)
            raise
        self._m.missing_values += int(nan.sum())
        self._m.missing_rows += int(skip.sum())

    def run(self, key, xs):
        """Advance one stream over a sequence: ``xs`` (T, input_size) -> (T, output_size).

        Equivalent to T calls of ``step([key], xs[t:t+1])``, but each layer's input projection is
        computed for all T steps in one product. A NaN is a missing value, handled by the
        engine's ``missing`` policy in time order (refused by default).
        """
        with self._lock:
            self._m.calls["run"] += 1
            t0 = _ns()
            k = normalize_key(key, "key")
            self._store.check_kind([k], "key")
            xs = self._matrix(xs, "xs", None, None)
            T = xs.shape[0]
            out = np.empty((T, self._n_out), self.dtype)
            if T == 0:
                self._m_ran(0, 0, t0)
                return out
            if self._track:
                self._admit([k], xs, "xs")
            if self._run_scratch.shape[0] < T + 1:  # allocate first, then open the key
                self._run_scratch = aligned_zeros((max(T + 1, 2 * self._run_scratch.shape[0]),
                                                   self._packed.scratch_width), self.dtype)
            store = self._store
            slots, opened = store.slots([k])
            try:
                bad = self._run_rows(slots[0], xs, out)
                if bad != -1:
                    if bad >= 0 and store.missing != "refuse" and not np.isinf(xs).any():
                        self._run_missing(slots[0], k, xs, out)
                    else:
                        self._refuse(bad, xs, [k], None, "xs")
                elif store.last is not None:  # missing="last": remember the latest values
                    store.last[slots[0]] = xs[-1]
            except BaseException:
                self._store.rollback(opened)
                raise
            if self._track:
                self._touch([k])
            self._m_ran(T, len(opened), t0)
            return out

    def warmup(self):
        """Make every kernel this engine's dtype can call ready, so that no later call compiles.

        Loads each kernel from Numba's on-disk cache or compiles it there: the one-event path,
        the batch kernels (serial, parallel over rows, parallel over weight panels), both
        ``run`` kernels and the int-key table's kernels, whatever the thread count. The kernels
        depend on the dtype, the weights form (``weights``) and the CPU, and the one-event
        kernel on the model's cell set (``kernels.kernels_for``), not on the model's sizes:
        after this, a new process on a CPU of the same kind (and with the same cache
        directory) loads them instead of compiling them. Stream states are untouched; no
        kernel runs on them.

        Returns
        -------
        dict
            ``{kernel name: (signatures loaded from the cache, signatures compiled)}`` for each
            kernel this call made ready (see ``kernels.cache_dir()`` for where they live).

        Examples
        --------
        >>> from streamgru import Engine, GRUModel
        >>> engine = Engine(GRUModel.random(3, 8))
        >>> _ = engine.warmup()  # loads (or compiles) once per process; then steps compile nothing
        """
        before = K.cache_counts()
        with self._lock:
            p, store = self._packed, self._store
            x = np.zeros(self._shape1, self.dtype)
            out = np.zeros((1, self._n_out), self.dtype)
            one = (p.params, p.table, p.fp, store.states, 0, x, out, self._run_scratch,
                   self.check_finite, 0)
            many = (p.params, p.table, p.fp, store.states, np.zeros(1, np.int64), x, out,
                    self._scratch, self._iwork, store.mark, self.check_finite)
            ks = p.kernels
            for kernel, args in ((ks.step_one, one), (ks.run_sequence, one),
                                 (ks.run_sequence_wide, one[:-1] + (2,)), (ks.step_serial, many),
                                 (ks.step_parallel, many), (ks.step_wide, many)):
                K.compile_for(kernel, args)
        # The int-key table's kernels, through a throwaway engine: a batch of int keys opens
        # them (a lookup, then an insert), the next call looks them up. (Fewer keys than
        # state.PY_PROBE_MAX take Python probes, and a close never calls a kernel.)
        spare = Engine(self.model, dtype=self.dtype, capacity=INT_TABLE_MIN_ROWS,
                       threads=self.threads, check_finite=self.check_finite)
        keys = np.arange(INT_TABLE_MIN_ROWS, dtype=np.int64)
        xs = np.zeros((INT_TABLE_MIN_ROWS, self.model.input_size), self.dtype)
        spare.step(keys, xs)
        spare.step(keys, xs)
        after = K.cache_counts()
        return {name: (after[name][0] - before.get(name, (0, 0))[0],
                       after[name][1] - before.get(name, (0, 0))[1])
                for name in after if after[name] != before.get(name)}

    # ------------------------------------------------------------------------------------------
    # stream lifecycle

    def open(self, key, state=None):
        """Open a new stream with a zero state, or with ``state`` (any shape of state_size values).

        Raises KeyError if the key is already open (use ``set_state`` to overwrite).
        """
        with self._lock:
            self._m.calls["open"] += 1
            k = normalize_key(key, "key")
            self._store.check_kind([k], "key")
            vec = None if state is None else self._state_vector(state, "state")
            if self._track:
                self._sweep()
            if k in self._store.slot_of:
                raise KeyError(f"key: expected a key that is not open, got {k!r} (already open; "
                               f"use set_state or reset)")
            if self._track:
                self._admit([k], None, None)
            slot = self._store.open(k)
            if vec is not None:
                self._store.states[slot, :self.model.state_size] = vec
            if self._track:
                self._touch([k])
            self._m.opened += 1

    def reset(self, key):
        """Set an open stream's state back to zeros, and its last observed values (``missing=
        "last"``) to never observed (counts as a use of the stream)."""
        with self._lock:
            self._m.calls["reset"] += 1
            if self._track:
                normalize_key(key, "key")
                self._sweep()
            slot = self._slot(key)
            self._store.states[slot] = 0
            if self._store.last is not None:
                self._store.last[slot] = 0
            if self._track:
                self._touch([normalize_key(key)])

    def close(self, key):
        """Forget a stream; its slot is reused. Raises KeyError for an unknown key.

        ``on_evict`` is not called: closing is the caller's own decision.
        """
        with self._lock:
            self._m.calls["close"] += 1
            if self._track:
                normalize_key(key, "key")
                self._sweep()
            self._slot(key)
            self._store.close(normalize_key(key))
            self._m.closed += 1

    def state(self, key):
        """A copy of the stream's state, shape ``(state_size,)``. KeyError if unknown."""
        with self._lock:
            self._m.calls["state"] += 1
            slot = self._slot(key)
            return self._store.states[slot, :self.model.state_size].copy()

    @property
    def missing(self):
        """The missing-value policy: "refuse", "skip", "zero" or "last" (see ``Engine``)."""
        return self._store.missing

    def last_observed(self, key):
        """A copy of the stream's last observed input values, shape ``(input_size,)``: 0 for a
        feature never observed (``missing="last"`` only). KeyError if the key is unknown.

        Examples
        --------
        >>> import numpy as np
        >>> from streamgru import Engine, GRUModel
        >>> engine = Engine(GRUModel.random(2, 4), missing="last")
        >>> _ = engine.step(["a"], np.array([[np.nan, 5.0]]))
        >>> engine.last_observed("a").tolist()
        [0.0, 5.0]
        """
        with self._lock:
            self._m.calls["last_observed"] += 1
            if self._store.last is None:
                raise ValueError(f"missing: expected an engine made with missing='last' (only it "
                                 f"keeps last observed values), got missing={self.missing!r}")
            slot = self._slot(key)
            return self._store.last[slot].copy()

    def set_last_observed(self, key, values):
        """Overwrite an open stream's last observed input values (``missing="last"`` only).

        For moving a stream between engines, or taking back a batch: ``values`` has
        ``input_size`` finite elements. KeyError if the key is unknown; the stream's state is
        left as it is.

        Examples
        --------
        >>> import numpy as np
        >>> from streamgru import Engine, GRUModel
        >>> engine = Engine(GRUModel.random(2, 4), missing="last")
        >>> engine.open("a")
        >>> engine.set_last_observed("a", [1.5, -2.0])
        >>> engine.last_observed("a").tolist()
        [1.5, -2.0]
        """
        with self._lock:
            self._m.calls["set_last_observed"] += 1
            if self._store.last is None:
                raise ValueError(f"missing: expected an engine made with missing='last' (only it "
                                 f"keeps last observed values), got missing={self.missing!r}")
            slot = self._slot(key)
            arr = _plain_array(values, "values")
            if arr.dtype.kind not in "fiu":
                raise TypeError(f"values: expected real numbers, got dtype {arr.dtype}")
            n = self.model.input_size
            if arr.size != n:
                raise ValueError(f"values: expected {n} values (input_size), got shape "
                                 f"{arr.shape} ({arr.size} values)")
            with np.errstate(over="ignore"):  # too large for the dtype becomes inf: refused
                vec = np.asarray(arr, dtype=self.dtype).reshape(n)
            if not np.isfinite(vec).all():
                raise ValueError(f"values: expected finite values within {self.dtype.name} "
                                 f"range, got NaN/inf at "
                                 f"{np.flatnonzero(~np.isfinite(vec))[:10].tolist()}")
            self._store.last[slot] = vec

    def set_state(self, key, state):
        """Overwrite a stream's state (opens the key if unknown).

        ``state`` may have any shape with ``state_size`` elements, read in C order, e.g.
        ``(num_layers, hidden_size)`` for a uniform stack.
        """
        with self._lock:
            self._m.calls["set_state"] += 1
            k = normalize_key(key, "key")
            self._store.check_kind([k], "key")
            vec = self._state_vector(state, "state")
            if self._track:
                self._admit([k], None, None)
            slot = self._store.slot_of.get(k)
            if slot is None:
                slot = self._store.open(k)
                self._m.opened += 1
            self._store.states[slot, :self.model.state_size] = vec
            if self._track:
                self._touch([k])

    def __contains__(self, key):
        try:
            k = normalize_key(key)
        except (TypeError, ValueError):
            return False
        with self._lock:
            return k in self._store.slot_of

    def __len__(self):
        return len(self._store)

    def keys(self):
        """The open stream keys, as a list (least recently used first when the engine tracks use,
        i.e. with ``max_streams`` or ``idle_timeout``; otherwise in no guaranteed order)."""
        with self._lock:
            store = self._store
            return list(store.recency if store.recency is not None else store.slot_of)

    def evict_idle(self):
        """Evict every stream not used for ``idle_timeout`` seconds now; return their keys.

        Each goes to ``on_evict`` first, oldest first. Without ``idle_timeout`` nothing is evicted.

        Examples
        --------
        >>> import numpy as np
        >>> from streamgru import Engine, GRUModel
        >>> now = [0.0]
        >>> engine = Engine(GRUModel.random(2, 4), idle_timeout=60, clock=lambda: now[0])
        >>> _ = engine.step(["a"], np.ones((1, 2)))
        >>> now[0] = 61.0
        >>> engine.evict_idle(), len(engine)
        (['a'], 0)
        """
        with self._lock:
            self._m.calls["evict_idle"] += 1
            if not self._track:
                return []
            return self._sweep()

    @property
    def capacity(self):
        return self._store.capacity

    # ------------------------------------------------------------------------------------------
    # snapshots

    def save_state(self, path, metadata=None):
        """Write every stream's key and state to ``path`` atomically (temp file, fsync, rename).

        The file records the model's fingerprint; ``load_state`` refuses it for another model. A
        stream's state never holds NaN/inf (no verb writes one); should one ever, the save is
        refused with NonFiniteError naming its keys rather than write a file that cannot be
        loaded whole. ``metadata`` (optional): a dict of JSON values saved in the same file by
        the same atomic write, e.g. how much input the states cover; ``load_state`` returns it.
        With ``missing="last"``, every stream's last observed values are saved with its state.
        """
        from .formats import save_state

        with self._lock:
            self._m.calls["save_state"] += 1
            t0 = _ns()
            store = self._store
            # Least recently used first when tracked, so load_state restores the LRU order.
            keys = list(store.recency if store.recency is not None else store.slot_of)
            slots = np.fromiter((self._store.slot_of[k] for k in keys), np.int64, len(keys))
            states = self._store.states[slots, :self.model.state_size]
            last = None if store.last is None else store.last[slots]
            save_state(path, keys, states, self.model.fingerprint, metadata, last=last)
            self._m.snapshots += 1
            self._m.snapshot_ns += _ns() - t0
            try:  # the file just written (renamed into place atomically)
                self._m.snapshot_bytes += os.stat(path).st_size
            except (OSError, TypeError, ValueError):  # pragma: no cover - e.g. removed meanwhile
                pass

    def load_state(self, path, skip_nonfinite=False):
        """Replace every stream by those saved in ``path`` (see ``save_state``).

        Streams open now but absent from the file are closed. On any error nothing changes.

        Last observed values (``missing="last"``) come back from a snapshot that has them; a
        snapshot without them (saved by an engine with another policy, or before they existed)
        loads with every stream's values never observed (0). An engine with another policy
        ignores them: it has no use for them, and the states load the same either way.

        A snapshot's states are converted to the engine's dtype (a float64 snapshot loaded into
        a float32 engine is rounded to float32). A state that holds NaN/inf, or a value too large
        for the engine's dtype, cannot be stepped: by default the whole load is refused with
        NonFiniteError naming those keys (nothing changes); with ``skip_nonfinite=True`` every
        other stream is loaded and those keys are left out.

        Parameters
        ----------
        path : str or path-like
        skip_nonfinite : bool
            Load the finite streams of a snapshot that holds some non-finite ones.

        Returns
        -------
        LoadedState
            ``metadata``: the dict the file was saved with (None if it has none); ``skipped``:
            the keys left out (empty unless ``skip_nonfinite`` and the file held such states).
        """
        from .formats import load_state

        with self._lock:
            self._m.calls["load_state"] += 1
        keys, states, metadata, last = load_state(path, self.model.fingerprint,
                                                  self.model.state_size, with_metadata=True,
                                                  with_last=True)
        keep_last = self._store.last is not None  # the policy is fixed: no lock needed
        if not keep_last:
            last = None
        elif last is not None and last.shape[1] != self.model.input_size:
            raise FormatError(f"{path}: expected last observed values of {self.model.input_size} "
                              f"features (input_size), got shape {last.shape}")
        with np.errstate(over="ignore"):  # too large for the dtype becomes inf: handled below
            states = np.asarray(states, dtype=self.dtype)
            if last is not None:
                last = np.asarray(last, dtype=self.dtype)
                states_and_last = np.concatenate([states, last], axis=1)
        skipped = []
        finite = np.isfinite(states if last is None else states_and_last).all(axis=1) if keys \
            else np.ones(0, bool)
        if not finite.all():
            skipped = [keys[i] for i in np.flatnonzero(~finite)]
            if not skip_nonfinite:
                raise NonFiniteError(
                    f"path: expected finite states within {self.dtype.name} range, got NaN/inf (or "
                    f"values too large for {self.dtype.name}) in the states of key(s) "
                    f"{_key_list(skipped)}; nothing was changed "
                    f"(load_state(path, skip_nonfinite=True) loads the other streams)", skipped)
            keys = [keys[i] for i in np.flatnonzero(finite)]
            states = states[finite]
            if last is not None:
                last = last[finite]
        with self._lock:
            if self._in_callback:
                raise RuntimeError("on_evict: expected a callback that does not call the engine's "
                                   "mutating verbs, got a call to load_state from inside it")
            if self.max_streams is not None and len(keys) > self.max_streams:
                raise ValueError(f"path: expected at most max_streams={self.max_streams} streams, got "
                                 f"a snapshot of {len(keys)}; nothing was changed")
            store = StateStore(self.model.state_size, self.dtype,
                               max(self._store.capacity, len(keys), 1), track=self._track,
                               limit=self.max_streams, missing=self.missing,
                               memory=self.model.input_size if keep_last else 0)
            store.slots(keys)  # one batch: int keys go into the table in one kernel call
            if self._track:  # every loaded stream counts as used now, in the file's order
                self._now = self._clock() if self.idle_timeout is not None else 0.0
                store.touch(keys, self._now)
                self._idle_due = self._now + self.idle_timeout if self.idle_timeout is not None \
                    else math.inf
            if keys:
                slots = np.fromiter((store.slot_of[k] for k in keys), np.int64, len(keys))
                store.states[slots, :self.model.state_size] = states
                if last is not None:
                    store.last[slots] = last
            self._m.closed += len(self._store)  # every stream is replaced by the file's
            self._m.opened += len(keys)
            self._store = store
        return LoadedState(metadata, skipped)

    # ------------------------------------------------------------------------------------------
    # metrics

    def stats(self):
        """Counters of this engine's work since it was created, as a plain dict (a snapshot).

        Cheap and thread-safe: every counter is an int the verbs update under the engine's lock;
        this takes the same lock and copies them. ``streamgru.metrics`` exposes them to
        Prometheus (docs/operations.md lists every series).

        Returns
        -------
        dict
            ``calls``: ``{verb: calls}`` for ``step``, ``run``, ``open``, ``reset``, ``close``,
            ``state``, ``set_state``, ``save_state``, ``load_state``, ``evict_idle``, counted as
            they start, refused ones included.
            ``rows``: ``{"step": rows, "run": steps}`` of calls that returned (rows held
            rather than stepped under ``missing="skip"`` included: ``missing["rows"]`` counts
            those).
            ``rows_refused``: ``{"step": rows, "run": steps}`` of calls refused with
            ``NonFiniteError`` (which change nothing).
            ``rows_per_call``: ``{"step": hist, "run": hist}`` over calls that returned.
            ``call_seconds``: ``{"step": hist, "run": hist}``, wall time inside the verb (lock
            wait excluded), of calls that returned. Step calls are timed in a systematic sample,
            those whose number is a multiple of ``hist["sampled_every"]``
            (``STEP_TIMING_EVERY``, 32): its count is about one in 32 step calls; run calls are
            all timed (``sampled_every`` 1).
            ``streams``: ``open`` (now), ``opened`` (by step, run, open, set_state, and loaded
            by load_state), ``closed`` (by close, and replaced by load_state), ``evicted``:
            ``{"idle": n, "capacity": n}``. ``open == opened - closed - idle - capacity``.
            ``snapshots``: ``written``, ``bytes`` and ``seconds`` of ``save_state`` calls that
            returned.
            ``missing``: ``policy`` (``Engine(missing=...)``), ``values`` (NaN values handled
            by it) and ``rows`` (rows or run steps holding them), in calls that returned; 0 under
            "refuse", whose refusals count in ``rows_refused``.

            A histogram ``hist`` is ``{"bounds": tuple, "counts": list, "sum": number}``:
            ``counts[i]`` (not cumulative) counts values ``<= bounds[i]`` and above the previous
            bound; the last count is for values above every bound. ``sum`` adds the values.

        Examples
        --------
        >>> import numpy as np
        >>> from streamgru import Engine, GRUModel
        >>> engine = Engine(GRUModel.random(3, 8))
        >>> _ = engine.step(["a", "b", "a"], np.ones((3, 3)))
        >>> s = engine.stats()
        >>> s["calls"]["step"], s["rows"]["step"], s["streams"]["open"]
        (1, 3, 2)
        """
        with self._lock:
            # One-event fast-path calls are not counted one by one (their path's only metric
            # statement is the countdown): they are the step calls that took neither the
            # general path nor the fast path's refusal. Each stepped one row.
            m = self._m
            steps = m.step + STEP_TIMING_EVERY - self._tick
            fast = steps - m.general - m.fast_refused
            rows_step = m.rows_counts[0].copy()
            rows_step[0] += fast
            st = {
                "calls": {"step": steps, **m.calls},
                "rows": {"step": m.rows_sum[0] + fast, "run": m.rows_sum[1]},
                "rows_refused": {"step": m.rows_refused[0], "run": m.rows_refused[1]},
                "rows_per_call": {
                    "step": {"bounds": ROWS_BOUNDS, "counts": rows_step,
                             "sum": m.rows_sum[0] + fast},
                    "run": {"bounds": ROWS_BOUNDS, "counts": m.rows_counts[1].copy(),
                            "sum": m.rows_sum[1]}},
                "call_seconds": {
                    name: {"bounds": SECONDS_BOUNDS, "counts": counts[:-1],
                           "sum": counts[-1] * 1e-9, "sampled_every": every}
                    for name, counts, every in (("step", m.step_seconds, STEP_TIMING_EVERY),
                                                ("run", m.run_seconds, 1))},
                "streams": {"open": len(self._store), "opened": m.opened,
                            "closed": m.closed,
                            "evicted": {"idle": m.evicted_idle,
                                        "capacity": m.evicted_capacity}},
                "snapshots": {"written": m.snapshots, "bytes": m.snapshot_bytes,
                              "seconds": m.snapshot_ns * 1e-9},
                "missing": {"policy": self.missing, "values": m.missing_values,
                            "rows": m.missing_rows},
            }
        return st

    def _metrics_init(self):
        """The counters behind :meth:`stats`, all zero, in two attributes: the step countdown
        and one holder for the rest. An instance with 30 or more attributes loses CPython's
        (3.11) inline attribute layout and every attribute read of the hot path gets slower: an
        Engine keeps at most 29 (tests/test_metrics.py)."""
        self._m = _Counters()
        self._tick = STEP_TIMING_EVERY  # step calls left until the next timed one

    def _m_sample(self):
        """The step countdown ran out: count its calls, restart it, and return the clock (ns)
        this step call, the timed one, starts at."""
        self._m.step += STEP_TIMING_EVERY
        self._tick = STEP_TIMING_EVERY
        return _ns()

    @staticmethod
    def _m_timed(hist, t0):
        d = _ns() - t0
        hist[bisect_left(_NS_BOUNDS, d)] += 1
        hist[-1] += d

    def _m_stepped(self, n, opened, t0):
        """A general-path step call of ``n`` rows returned, having opened ``opened`` streams."""
        self._m.rows_counts[0][bisect_left(ROWS_BOUNDS, n)] += 1
        self._m.rows_sum[0] += n
        self._m.opened += opened
        if t0:
            self._m_timed(self._m.step_seconds, t0)

    def _m_ran(self, steps, opened, t0):
        """A run call of ``steps`` steps returned, having opened ``opened`` streams."""
        self._m.rows_counts[1][bisect_left(ROWS_BOUNDS, steps)] += 1
        self._m.rows_sum[1] += steps
        self._m.opened += opened
        self._m_timed(self._m.run_seconds, t0)

    # ------------------------------------------------------------------------------------------
    # eviction (only when max_streams or idle_timeout is set; always under the lock)

    def _sweep(self, now=None):
        """Evict the streams unused for ``idle_timeout`` or longer, oldest first; return their keys."""
        if self._in_callback:
            raise RuntimeError("on_evict: expected a callback that does not call the engine's "
                               "mutating verbs, got such a call from inside it")
        if self.idle_timeout is None:
            self._now = 0.0  # only the order of use matters: no clock needed
            return []
        if now is None:
            now = self._clock()
        self._now = now
        if now < self._idle_due:  # the common case: one comparison
            return []
        store = self._store
        evicted = []
        for k, t in store.idle(now - self.idle_timeout):
            self._evict(k, t)
            self._m.evicted_idle += 1
            evicted.append(k)
        oldest = store.oldest_time()
        self._idle_due = math.inf if oldest is None else oldest + self.idle_timeout
        return evicted

    def _admit(self, ks, x, what):
        """Before a call that may open ``ks`` (canonical, validated): refuse a batch that cannot
        fit, evict idle streams, then evict least recently used streams not in ``ks`` until the
        call's new keys fit in ``max_streams``."""
        if self._in_callback:
            raise RuntimeError("on_evict: expected a callback that does not call the engine's "
                               "mutating verbs, got such a call from inside it")
        store, lim = self._store, self.max_streams
        batch = None
        if lim is not None and len(store) + len(ks) > lim:  # else nothing can need room: O(1)
            batch = set(ks)
            if len(batch) > lim:
                raise ValueError(f"keys: expected at most max_streams={lim} distinct keys in one "
                                 f"call, got {len(batch)}; split the batch (nothing was changed)")
        now = self._clock() if self.idle_timeout is not None else 0.0
        due = now >= self._idle_due
        need = 0 if batch is None else \
            len(store) + sum(1 for k in batch if k not in store.slot_of) - lim
        if (due or need > 0) and x is not None and self.check_finite and not np.isfinite(x).all() \
                and (self._store.missing == "refuse" or np.isinf(x).any()):
            # Checked here, before evicting, so that a refused call evicts nothing.
            self._raise_nonfinite(x, ks, what)
        self._sweep(now)
        if batch is not None and due:
            need = len(store) + sum(1 for k in batch if k not in store.slot_of) - lim
        if need > 0:
            for k, t in store.lru(need, batch):
                self._evict(k, t)
                self._m.evicted_capacity += 1

    def _quiet(self):
        """For the one-row fast path of an open key: True when no idle eviction is due now (and
        we are not inside on_evict); records the time for the use."""
        if self._in_callback:
            return False
        now = self._clock() if self.idle_timeout is not None else 0.0
        self._now = now
        return now < self._idle_due

    def _touch(self, ks):
        self._store.touch(ks, self._now)
        if self._idle_due == math.inf and self.idle_timeout is not None:
            self._idle_due = self._now + self.idle_timeout

    def _evict(self, key, t):
        """Close ``key`` and hand its final state to ``on_evict``; if that raises, reopen it as it
        was (same state, still least recently used) and let the exception propagate."""
        store = self._store
        slot = store.slot_of[key]
        state = store.states[slot, :self.model.state_size].copy()
        last = None if store.last is None else store.last[slot].copy()  # dropped unless restored
        store.close(key)
        if self.on_evict is None:
            return
        self._in_callback = True
        try:
            self.on_evict(key, state.copy())
        except BaseException:
            store.restore(key, state, t, last)
            raise
        finally:
            self._in_callback = False

    # ------------------------------------------------------------------------------------------
    # validation helpers (the public boundary)

    def _keys_arg(self, keys, what):
        ks, _ = normalize_keys(keys, self._store.key_kind, what)
        return ks.tolist() if isinstance(ks, np.ndarray) else ks

    def _int_keys(self, keys, what):
        """A 1-D integer key array as int64 (C-contiguous), refusing uint64 keys past int64."""
        if keys.dtype.kind == "u" and keys.size and keys.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{what}: expected keys within int64, got {keys.max()}")
        return np.ascontiguousarray(keys, dtype=np.int64)

    def _matrix(self, x, what, n, n_what):
        return float_matrix(x, what, n, n_what, self.model.input_size, self.dtype)

    def _state_vector(self, state, what):
        arr = _plain_array(state, what)
        if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
            raise TypeError(f"{what}: expected a float array, got dtype {arr.dtype}")
        if arr.size != self.model.state_size:
            raise ValueError(f"{what}: expected {self.model.state_size} values (state_size), got "
                             f"shape {arr.shape} ({arr.size} values)")
        with np.errstate(over="ignore"):  # too large for the dtype becomes inf: refused below
            vec = np.asarray(arr, dtype=self.dtype).reshape(-1)
        if not np.isfinite(vec).all():
            raise ValueError(f"{what}: expected finite values within {self.dtype.name} range, got "
                             f"NaN/inf (or an overflow) at "
                             f"{np.flatnonzero(~np.isfinite(vec))[:10].tolist()}")
        return vec

    def _slot(self, key):
        k = normalize_key(key, "key")
        slot = self._store.slot_of.get(k)
        if slot is None:
            raise KeyError(f"key: expected an open stream, got unknown key {k!r}")
        return slot

    def _raise_nonfinite(self, x, ks, what):
        """Refuse input ``x`` (rows for keys ``ks``) holding NaN/inf: NonFiniteError naming the
        keys of the bad rows (for ``run``, the steps)."""
        self._m.rows_refused[0 if what == "x" else 1] += len(x)
        if self._store.missing == "refuse":
            rows = np.flatnonzero(~np.isfinite(np.asarray(x)).all(axis=1))
        else:  # NaN marks a missing value: only the rows holding inf are at fault
            rows = np.flatnonzero(np.isinf(np.asarray(x)).any(axis=1))
        if what == "xs":
            raise NonFiniteError(
                f"xs: expected finite values, got NaN/inf (or values too large for "
                f"{self.dtype.name}) in step(s) {rows[:10].tolist()}; state of {ks[0]!r} "
                f"unchanged (Engine(check_finite=False) skips this check)", ks)
        bad = list(dict.fromkeys(ks[i] for i in rows))
        raise NonFiniteError(
            f"{what}: expected finite values, got NaN/inf (or values too large for "
            f"{self.dtype.name}) in the rows of key(s) {_key_list(bad)}; no stream was changed "
            f"(Engine(check_finite=False) skips this check)", bad)

    def _refuse(self, code, x, ks, iwork, what, counted=None):
        """Turn a kernel's error code into NonFiniteError: ``code >= 0`` is an input row holding
        NaN/inf; kernels.PRODUCED_NONFINITE means the step would have written NaN/inf into a
        state or an output (every state was restored): the plan-order flags in ``iwork`` (None
        for a single stream) say which rows. ``counted``: the rows of the whole call when ``x``
        is a part of it (the missing-value paths), for the refused-rows counter."""
        if code >= 0:
            self._raise_nonfinite(x, ks, what)
        self._m.rows_refused[0 if what == "x" else 1] += len(x) if counted is None else counted
        if iwork is None:
            bad = list(ks[:1])
        else:
            n = len(ks)
            nm = (iwork.shape[0] - 1) // 4
            rows = np.sort(iwork[:n][iwork[3 * nm + 1:3 * nm + 1 + n] != 0])
            bad = list(dict.fromkeys(ks[i] for i in rows))
        raise NonFiniteError(
            f"{what}: expected inputs whose step keeps every state and output finite, got a step "
            f"that would produce NaN/inf (from non-finite input or an overflow in "
            f"{self.dtype.name}) for key(s) "
            f"{_key_list(bad)}; no stream was changed (drop those rows and call again)", bad)

    def _grow_scratch(self, n):
        rows = max(n, 2 * len(self._scratch), 16)
        # Both arrays first, then assign: a MemoryError leaves the old pair in place.
        scratch = aligned_zeros((rows, self._packed.scratch_width), self.dtype)
        iwork = np.zeros(4 * rows + 1, np.int64)  # order, wave, wstart, bad (kernels._plan)
        self._scratch, self._iwork = scratch, iwork

    def _parallel(self, kernel, args):
        """Call a parallel kernel with this engine's thread count. Numba's thread count is a
        setting of the calling thread: set ours only if it differs, and restore it after."""
        before = _get_num_threads()
        if before == self._par_threads:
            return kernel(*args)
        _set_num_threads(self._par_threads)
        try:
            return kernel(*args)
        finally:
            _set_num_threads(before)

    def _kernel(self, n):
        """The step kernel for n rows: serial, parallel over rows, or parallel over weight panels
        (few rows, large layers: each thread streams its share of the weights once); one row
        where the one-event path would run the one-event kernel goes there too (:meth:`_single`)."""
        if n == 1 and (self._par_threads == 1 or self._macs_per_row < WIDE_MIN_MACS):
            return self._single
        ks = self._packed.kernels
        if self._par_threads > 1:
            if n >= PARALLEL_MIN_ROWS:
                return ks.step_parallel
            if n * self._macs_per_row >= WIDE_MIN_MACS:
                return ks.step_wide
        return ks.step_serial

    def _single(self, params, table, fp, state, slots, x, out, scratch, iwork, mark,
                check_finite):
        """A batch kernel's call for one row, made with the one-event kernel (the same bits as
        step_serial): the first call on a new stream then compiles no more than the one-event
        path does. Sets the plan-order flags that :meth:`_refuse` reads, as the batch kernels do."""
        bad = self._packed.kernels.step_one(params, table, fp, state, int(slots[0]), x, out,
                                            scratch, check_finite, 0)
        nm = (iwork.shape[0] - 1) // 4
        iwork[0] = 0
        iwork[3 * nm + 1] = bad == K.PRODUCED_NONFINITE
        return bad

    @property
    def weights(self):
        """How the engine stores the weight matrices: ``"float32"``, ``"float64"``,
        ``"float16"`` or ``"int8"`` (the ``weights`` argument, resolved).

        Examples
        --------
        >>> from streamgru import Engine, Model
        >>> Engine(Model.random(3, 8), weights="int8").weights
        'int8'
        """
        return self._packed.weights

    def __repr__(self):
        return (f"Engine({self.model!r}, dtype={self.dtype.name!r}, weights={self.weights!r}, "
                f"streams={len(self)}, capacity={self.capacity}, threads={self.threads})")


# A layer kind of the protocol without a kernel cell (``Layer.runnable`` False: a kind being
# added, which has its class, the native file and the oracle before its cell) is refused here,
# by name, rather than packed as something else.


def check_runnable(model):
    """Refuse a model holding a layer kind the engine does not run yet, naming the layer.

    Raises
    ------
    UnsupportedModelError
        ``layers[i]`` is of a kind the kernels do not run (``Layer.runnable`` False: a kind
        whose kernel cell does not exist yet).
    """
    for i, layer in enumerate(model.layers):
        if not layer.runnable:
            kinds = ", ".join(k for k, cls in LAYER_KINDS.items() if cls.runnable)
            raise UnsupportedModelError(
                f"model: expected layers the engine runs ({kinds}), got "
                f"layers[{i}], a {layer.kind!r} layer, which the engine does not run yet (its "
                f"kernel cell does not exist); such a model can be converted, saved, loaded and "
                f"exported, not stepped"
            )


def check_missing(missing, check_finite):
    """Refuse a ``missing`` policy that is not one of :data:`MISSING_POLICIES`, or one other than
    "refuse" with ``check_finite`` off (the finite scan is what finds a NaN)."""
    if not isinstance(missing, str) or missing not in MISSING_POLICIES:
        raise ValueError(f"missing: expected one of {', '.join(map(repr, MISSING_POLICIES))}, "
                         f"got {missing!r}")
    if missing != "refuse" and not check_finite:
        raise ValueError(f"missing: expected 'refuse' with check_finite=False (the finite scan "
                         f"is what finds a missing value), got missing={missing!r} and "
                         f"check_finite=False; keep check_finite=True")


def _key_list(keys, limit=10):
    """``'a', 'b', ...`` for a message: the first ``limit`` keys."""
    return ", ".join(repr(k) for k in keys[:limit]) + (" ..." if len(keys) > limit else "")


def _is_dtype(d):
    try:
        np.dtype(d)
        return True
    except TypeError:
        return False


def _plain_array(x, what):
    """``x`` as a base-class ndarray. A masked array is refused if any value is masked (the
    mask is not read as missing values (NaN is), and reading the data under the mask would be a
    silent wrong answer); other subclasses and sequences are read as plain arrays. A ragged or
    otherwise unreadable sequence is a TypeError naming ``what``."""
    if isinstance(x, np.ma.MaskedArray):
        if np.ma.getmaskarray(x).any():
            raise ValueError(f"{what}: expected an array without masked values, got a masked array "
                             f"with {int(np.ma.getmaskarray(x).sum())} masked; fill them first "
                             f"(x.filled(value), or x.filled(np.nan) with Engine(missing=...))")
        return np.asarray(x.data)
    if type(x) is np.ndarray:
        return x
    try:
        return np.asarray(x)
    except Exception as exc:
        raise TypeError(f"{what}: expected a float array, got {type(x).__name__} that numpy "
                        f"cannot read as one ({str(exc).splitlines()[0]})") from None


def float_matrix(x, what, n, n_what, n_in, dtype):
    """Validate a (n, n_in) float input at the public boundary and return it C-contiguous,
    writable and of ``dtype`` (copied only when it is not). ``n`` None means any number of rows
    ("T"); ``n_what`` names what fixes n in the message (e.g. "len(keys)")."""
    if type(x) is not np.ndarray:
        x = _plain_array(x, what)
    if x.dtype.kind != "f":
        raise TypeError(
            f"{what}: expected a float32 or float64 array, got dtype {x.dtype}; "
            f"convert it with .astype(np.{dtype.name})"
        )
    if x.ndim != 2 or x.shape[1] != n_in or (n is not None and x.shape[0] != n):
        expect = (n if n is not None else "T", n_in)
        hint = f" ({n_what} = {n})" if n is not None else ""
        extra = "; for one row use x[None, :]" if x.ndim == 1 and n == 1 else ""
        raise ValueError(f"{what}: expected shape {expect}{hint}, got {x.shape}{extra}")
    if x.dtype != dtype or not x.flags.c_contiguous or not x.flags.writeable:
        # One kernel signature per dtype: convert here rather than compile another. A value too
        # large for the dtype becomes inf, which the finite check then refuses (quietly here).
        with np.errstate(over="ignore"):
            x = np.array(x, dtype=dtype, order="C", copy=True)
    return x
