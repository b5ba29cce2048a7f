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
* A call that raises changes nothing: no state, no opened key.

Threading: every verb holds the engine's lock, so calls from several threads are serialized
(each call sees the state left by the previous one; no torn states). The kernels release the GIL,
so other Python threads, and other engines, run meanwhile. A single call uses up to ``threads``
Numba threads for large batches.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numba
import numpy as np

from . import kernels as K
from .model import GRUModel
from .packing import pack
from .state import StateStore, normalize_key

__all__ = ["Engine"]

# Below this many rows a parallel region costs more than it saves (PERF_NOTES: entering one costs
# ~1-2 us, a small-batch step a few us).
PARALLEL_MIN_ROWS = 64
_DTYPES = {"float32": np.float32, "float64": np.float64}


class Engine:
    """Stateful multi-stream GRU inference.

    Parameters
    ----------
    model : GRUModel
        Read-only; its weights are cast once to ``dtype``.
    dtype : {"float32", "float64"}
        Arithmetic and state precision. Inputs of other float dtypes are converted on purpose.
    capacity : int
        Initial number of state slots; grows automatically (doubling) as streams are opened.
    threads : int, optional
        Cap on Numba threads used by one call (default: Numba's own setting).
    check_finite : bool
        Refuse NaN/inf inputs (default). ``False`` skips the scan.

    Examples
    --------
    >>> import numpy as np
    >>> from streamgru import Engine, GRUModel
    >>> engine = Engine(GRUModel.random(3, 8, dense_after=[(2, "softmax")]))
    >>> y = engine.step(["a", "b", "a"], np.ones((3, 3), np.float32))  # "a" steps twice
    >>> y.shape, len(engine), engine.state("a").shape
    ((3, 2), 2, (8,))
    """

    def __init__(self, model, dtype="float32", capacity=1024, threads=None, check_finite=True):
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
        self.model = model
        self.dtype = np.dtype(_DTYPES[key])
        self.threads = threads
        self._par_threads = threads if threads is not None else numba.config.NUMBA_NUM_THREADS
        self.check_finite = bool(check_finite)
        self._packed = pack(model, self.dtype)
        self._fast = self.dtype == np.float32
        self._store = StateStore(model.state_size, self.dtype, int(capacity))
        self._lock = threading.RLock()
        self._n_in = model.input_size
        self._n_out = model.output_size
        self._rows = 0
        self._grow_scratch(1)
        self._run_scratch = np.zeros((2, self._packed.scratch_width), self.dtype)

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
            arrays are copied; integer, bool, object and string arrays are refused.

        Returns
        -------
        numpy.ndarray, (n, output_size), the engine's dtype
            Row i is the output for keys[i] at this step.
        """
        with self._lock:
            ks = self._keys_arg(keys, "keys")
            n = len(ks)
            x = self._matrix(x, "x", n, "len(keys)")
            store = self._store
            slots, opened = store.slots(ks)
            out = np.empty((n, self._n_out), self.dtype)
            if n == 0:
                return out
            if n > self._rows:
                self._grow_scratch(n)
            p = self._packed
            args = (p.params, p.table, p.fp, store.states, slots, x, out, self._scratch,
                    self._order, self._wave, self._wstart, store.mark, self.check_finite,
                    self._fast)
            if n >= PARALLEL_MIN_ROWS and self._par_threads > 1:
                # Numba's thread count is a per-calling-thread setting: set ours, then restore.
                before = numba.get_num_threads()
                numba.set_num_threads(self._par_threads)
                try:
                    bad = K.step_parallel(*args)
                finally:
                    numba.set_num_threads(before)
            else:
                bad = K.step_serial(*args)
            if bad >= 0:
                store.rollback(opened)
                self._raise_nonfinite(x, ks, "x")
            return out

    def run(self, key, xs):
        """Advance one stream over a sequence: ``xs`` (T, input_size) -> (T, output_size).

        Equivalent to T calls of ``step([key], xs[t:t+1])``, but each layer's input projection is
        computed for all T steps in one product.
        """
        with self._lock:
            k = normalize_key(key, "key")
            self._store.check_kind([k], "key")
            xs = self._matrix(xs, "xs", None, None)
            T = xs.shape[0]
            out = np.empty((T, self._n_out), self.dtype)
            if T == 0:
                return out
            slots, opened = self._store.slots([k])
            if self._run_scratch.shape[0] < T + 1:
                self._run_scratch = np.zeros((max(T + 1, 2 * self._run_scratch.shape[0]),
                                              self._packed.scratch_width), self.dtype)
            p = self._packed
            bad = K.run_sequence(p.params, p.table, p.fp, self._store.states, slots[0], xs, out,
                                 self._run_scratch, self.check_finite, self._fast)
            if bad >= 0:
                self._store.rollback(opened)
                rows = np.flatnonzero(~np.isfinite(xs).all(axis=1))
                raise ValueError(
                    f"xs: expected finite values, got NaN/inf in step(s) {rows[:10].tolist()}; "
                    f"state of {k!r} unchanged"
                )
            return out

    # ------------------------------------------------------------------------------------------
    # stream lifecycle

    def open(self, key, state=None):
        """Open a new stream with a zero state, or with ``state`` (any shape of state_size values).

        Raises KeyError if the key is already open (use ``set_state`` to overwrite).
        """
        with self._lock:
            k = normalize_key(key, "key")
            self._store.check_kind([k], "key")
            if k in self._store.slot_of:
                raise KeyError(f"key: expected a key that is not open, got {k!r} (already open; "
                               f"use set_state or reset)")
            vec = None if state is None else self._state_vector(state, "state")
            slot = self._store.open(k)
            if vec is not None:
                self._store.states[slot, :self.model.state_size] = vec

    def reset(self, key):
        """Set an open stream's state back to zeros."""
        with self._lock:
            slot = self._slot(key)
            self._store.states[slot] = 0

    def close(self, key):
        """Forget a stream; its slot is reused. Raises KeyError for an unknown key."""
        with self._lock:
            self._slot(key)
            self._store.close(normalize_key(key))

    def state(self, key):
        """A copy of the stream's state, shape ``(state_size,)``. KeyError if unknown."""
        with self._lock:
            slot = self._slot(key)
            return self._store.states[slot, :self.model.state_size].copy()

    def set_state(self, key, state):
        """Overwrite a stream's state (opens the key if unknown).

        ``state`` may have any shape with ``state_size`` elements, read in C order, e.g.
        ``(num_layers, hidden_size)`` for a uniform stack.
        """
        with self._lock:
            k = normalize_key(key, "key")
            self._store.check_kind([k], "key")
            vec = self._state_vector(state, "state")
            slot = self._store.slot_of.get(k)
            if slot is None:
                slot = self._store.open(k)
            self._store.states[slot, :self.model.state_size] = vec

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
        """The open stream keys, as a list (in no guaranteed order)."""
        with self._lock:
            return list(self._store.slot_of)

    @property
    def capacity(self):
        return self._store.capacity

    # ------------------------------------------------------------------------------------------
    # snapshots

    def save_state(self, path):
        """Write every stream's key and state to ``path`` atomically (temp file, fsync, rename).

        The file records the model's fingerprint; ``load_state`` refuses it for another model.
        """
        from .formats import save_state

        with self._lock:
            keys = list(self._store.slot_of)
            slots = np.fromiter((self._store.slot_of[k] for k in keys), np.int64, len(keys))
            states = self._store.states[slots, :self.model.state_size]
            save_state(path, keys, states, self.model.fingerprint)

    def load_state(self, path):
        """Replace every stream by those saved in ``path`` (see ``save_state``).

        Streams open now but absent from the file are closed. On any error nothing changes.
        """
        from .formats import load_state

        keys, states = load_state(path, self.model.fingerprint, self.model.state_size)
        with self._lock:
            store = StateStore(self.model.state_size, self.dtype,
                               max(self._store.capacity, len(keys), 1))
            for k in keys:
                store.open(k)
            if keys:
                slots = np.fromiter((store.slot_of[k] for k in keys), np.int64, len(keys))
                store.states[slots, :self.model.state_size] = states
            self._store = store

    # ------------------------------------------------------------------------------------------
    # validation helpers (the public boundary)

    def _keys_arg(self, keys, what):
        if isinstance(keys, np.ndarray):
            if keys.ndim != 1:
                raise ValueError(f"{what}: expected a 1-D sequence of keys, got an array of "
                                 f"shape {keys.shape}")
            if keys.dtype.kind not in "iuU" or keys.dtype.kind == "b":
                raise TypeError(f"{what}: expected integer or str keys, got an array of dtype "
                                f"{keys.dtype}")
            if keys.dtype.kind == "u" and keys.size and keys.max() > np.iinfo(np.int64).max:
                raise ValueError(f"{what}: expected keys within int64, got {keys.max()}")
            ks = keys.tolist()
        elif isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
            raise TypeError(f"{what}: expected a sequence of int or str keys, got "
                            f"{type(keys).__name__}; wrap a single key in a list: [key]")
        else:
            ks = [normalize_key(k, f"{what}[{i}]") for i, k in enumerate(keys)]
        self._store.check_kind(ks, what)
        return ks

    def _matrix(self, x, what, n, n_what):
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except Exception as exc:
                raise TypeError(f"{what}: expected a float array, got {type(x).__name__} ({exc})") \
                    from None
        if x.dtype.kind != "f":
            raise TypeError(
                f"{what}: expected a float32 or float64 array, got dtype {x.dtype}; "
                f"convert it with .astype(np.{self.dtype.name})"
            )
        expect = (n if n is not None else "T", self._n_in)
        if x.ndim != 2 or x.shape[1] != self._n_in or (n is not None and x.shape[0] != n):
            hint = f" ({n_what} = {n})" if n is not None else ""
            extra = "; for one row use x[None, :]" if x.ndim == 1 and n == 1 else ""
            raise ValueError(f"{what}: expected shape {expect}{hint}, got {x.shape}{extra}")
        if x.dtype != self.dtype or not x.flags.c_contiguous or not x.flags.writeable:
            # One kernel signature per dtype: convert here rather than compile another.
            x = np.array(x, dtype=self.dtype, order="C", copy=True)
        return x

    def _state_vector(self, state, what):
        arr = state if isinstance(state, np.ndarray) else np.asarray(state)
        if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
            raise TypeError(f"{what}: expected a float array, got dtype {arr.dtype}")
        if arr.size != self.model.state_size:
            raise ValueError(f"{what}: expected {self.model.state_size} values (state_size), got "
                             f"shape {arr.shape} ({arr.size} values)")
        vec = np.asarray(arr, dtype=self.dtype).reshape(-1)
        if not np.isfinite(vec).all():
            raise ValueError(f"{what}: expected finite values, got NaN/inf at "
                             f"{np.flatnonzero(~np.isfinite(vec))[:10].tolist()}")
        return vec

    def _slot(self, key):
        k = normalize_key(key, "key")
        slot = self._store.slot_of.get(k)
        if slot is None:
            raise KeyError(f"key: expected an open stream, got unknown key {k!r}")
        return slot

    def _raise_nonfinite(self, x, ks, what):
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
        bad = sorted({repr(ks[i]) for i in rows})
        raise ValueError(
            f"{what}: expected finite values, got NaN/inf in the rows of key(s) "
            f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; no stream was changed "
            f"(Engine(check_finite=False) skips this check)"
        )

    def _grow_scratch(self, n):
        rows = max(n, 2 * self._rows, 16)
        self._rows = rows
        self._scratch = np.zeros((rows, self._packed.scratch_width), self.dtype)
        self._order = np.zeros(rows, np.int64)
        self._wave = np.zeros(rows, np.int64)
        self._wstart = np.zeros(rows + 1, np.int64)

    def __repr__(self):
        return (f"Engine({self.model!r}, dtype={self.dtype.name!r}, streams={len(self)}, "
                f"capacity={self.capacity}, threads={self.threads})")


def _is_dtype(d):
    try:
        np.dtype(d)
        return True
    except TypeError:
        return False
