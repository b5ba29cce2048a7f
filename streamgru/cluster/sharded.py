"""The sharded engine: ``ShardedEngine`` in the driver, one ``Engine`` per Ray actor (needs Ray).

Placement: a stream's shard is :func:`~streamgru.cluster.shard_of` (rendezvous hashing, stable
across processes; see :mod:`streamgru.cluster.placement`).

State policy (as on ``Engine``, per stream)
-------------------------------------------
``step``/``run``/``open``/``reset``/``close``/``state``/``set_state`` act on the stream's shard
exactly as on an ``Engine``. A call that raises an input error (``TypeError``/``ValueError``/
``KeyError``) changes nothing: inputs are validated in the driver before any shard is touched.
One exception: a step whose *result* would hold NaN/inf (e.g. an overflow) is found by the shard
that computes it. That shard changes nothing, but the other shards of the call have applied their
rows by then: ``step`` raises :class:`~streamgru.errors.NonFiniteError` naming the refused keys,
with ``applied`` (bool per row) and ``outputs`` (NaN where not applied) set on the error.
``resize`` moves each migrating stream's state to its new shard; no stream is lost or
duplicated, and calls from other threads wait while it runs. Missing values
(``ShardedEngine(missing=...)``, as on ``Engine``): the driver refuses inf (and NaN under
"refuse") before any shard is touched; each shard applies the policy to its rows; a stream's
last observed values (``missing="last"``) move with its state on ``resize`` and are in its
shard's snapshot file.

Failures and what is lost
-------------------------
Each shard is a Ray actor with ``max_restarts``. When an actor process dies, Ray starts a new one;
the new one refuses every call until the driver has restored it from the **restore point**: the
last ``checkpoint()`` (taken every ``checkpoint_every`` seconds into ``checkpoint_dir``, and
after every ``resize``/``load_state`` when ``checkpoint_dir`` is set), or the last ``load_state``,
or nothing (an empty shard) if there was neither. The driver remembers which keys each shard
changed since the restore point (stepped, run, opened, reset, set, closed or moved in) and raises
:class:`ShardLostError` naming the shard and exactly those keys. After the error, those keys are
as they were at the restore point: streams opened since then are gone, streams closed since then
are back, every other stream of that shard lost the events since then. Keys the shard did not
change since the restore point, and every other shard, lose nothing. The caller can replay those
keys' events since ``error.restore_time`` (or reset/close them) and carry on: the engine stays
usable. A loss found by the background checkpoint thread is raised by the next call.
A shard that exhausts ``max_restarts`` stays lost: every call that needs it raises.

Snapshots
---------
``save_state(directory)`` writes one state file per shard (the ``Engine.save_state`` format,
atomic, checksummed), then ``manifest.json`` (atomically, last), then deletes the files of the
manifest it replaced. A crash at any point leaves the previous manifest and its files intact.
``load_state(directory)`` accepts a snapshot made with any shard count: keys are re-placed.
The actors read and write these files themselves, so on a multi-machine cluster the directory
must be on a file system that every node sees at the same path.

Examples
--------
>>> import numpy as np, ray                                         # doctest: +SKIP
>>> from streamgru import GRUModel
>>> from streamgru.cluster import ShardedEngine
>>> ray.init(num_cpus=2, include_dashboard=False)                   # doctest: +SKIP
>>> with ShardedEngine(GRUModel.random(3, 8), shards=2) as eng:      # doctest: +SKIP
...     y = eng.step([1, 2, 1], np.ones((3, 3), np.float32))
...     print(y.shape, len(eng))
(3, 8) 2
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path

import numpy as np

from ..engine import check_missing, check_runnable, float_matrix
from ..errors import FormatError, NonFiniteError
from ..model import GRUModel
from ..packing import weights_form
from ..state import check_kind, normalize_key, normalize_keys
from .placement import PLACEMENT, owners, positive_int

__all__ = ["ShardedEngine", "ShardLostError", "StepFuture", "start_local_ray", "MANIFEST_FORMAT"]

MANIFEST_FORMAT = "streamgru-sharded-state"
MANIFEST_VERSION = "1"
MANIFEST_NAME = "manifest.json"
_DTYPES = ("float32", "float64")


# ----------------------------------------------------------------------------------------------
# errors and futures


class ShardLostError(RuntimeError):
    """A shard's actor died (or was unreachable) and the streams it had changed since its restore
    point lost those changes.

    Attributes
    ----------
    lost : dict {shard: list of keys}
        Per lost shard, the keys whose state went back to the restore point (or is gone).
    keys : list
        All of them.
    shards : list of int
    restore_time : dict {shard: float or None}
        Unix time of the restore point each shard was restored from (None: it restarted empty).
    permanent : bool
        True if a shard could not be restarted (``max_restarts`` exhausted): it stays lost.
    outputs : numpy.ndarray or None
        For a ``step``: the outputs, with NaN rows for the rows sent to lost shards.
    applied : numpy.ndarray of bool or None
        For a ``step``: which rows were applied (rows for healthy shards were).
    """

    def __init__(self, message, lost, restore_time, permanent=False, outputs=None, applied=None):
        super().__init__(message)
        self.lost = lost
        self.shards = sorted(lost)
        self.keys = [k for s in self.shards for k in lost[s]]
        self.restore_time = restore_time
        self.permanent = permanent
        self.outputs = outputs
        self.applied = applied


class _Recovered:
    """Reply of a restarted actor that has not been restored yet (it refuses every call)."""

    __slots__ = ("instance",)

    def __init__(self, instance):
        self.instance = instance

    def __reduce__(self):
        return (_Recovered, (self.instance,))


class _Loss:
    """What the driver learned about one shard's restart."""

    def __init__(self, shard, old_instance, keys, restore_time, permanent, cause, reported=False):
        self.shard = shard
        self.old_instance = old_instance
        self.keys = keys
        self.restore_time = restore_time
        self.permanent = permanent
        self.cause = cause
        self.reported = reported


class StepFuture:
    """The pending result of :meth:`ShardedEngine.step_async`.

    Wait with ``fut.result(timeout=None)`` (blocking) or ``await fut`` (asyncio). The Ray
    ``ObjectRef`` of each shard's part is in ``fut.refs`` (for ``ray.wait``). Results come back in
    input order; a lost shard raises :class:`ShardLostError` from ``result``.
    """

    def __init__(self, engine, n, parts):
        self._engine = engine
        self._n = n
        self._parts = parts  # list of (shard, instance, ref, rows: int64 array or None, keys)
        self.refs = [p[2] for p in parts]
        self._done = False
        self._value = None
        self._error = None

    def done(self):
        """True when every shard has answered (``result`` will not block)."""
        if self._done or not self.refs:
            return True
        import ray

        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(ready) == len(self.refs)

    def result(self, timeout=None):
        """The outputs, ``(n, output_size)``, in input order. Raises ``TimeoutError`` on timeout."""
        if not self._done:
            self._value, self._error = self._engine._collect(self._n, self._parts, timeout)
            self._done = True
            self._parts = None
        if self._error is not None:
            raise self._error
        return self._value

    def __await__(self):
        import asyncio

        if self.refs and not self._done:
            yield from asyncio.gather(*self.refs, return_exceptions=True).__await__()
        return self.result()


# ----------------------------------------------------------------------------------------------
# the actor


class _Shard:
    """One shard: an ``Engine`` inside a Ray actor. Every public method refuses work (returns
    ``_Recovered``) while the actor is a restarted one that the driver has not restored yet."""

    def __init__(self, model_bytes, dtype, capacity, threads, shard, missing="refuse",
                 weights=None):
        import ray

        from ..engine import Engine
        from ..formats import model_from_bytes

        self._Engine = Engine
        self.model = model_from_bytes(model_bytes)
        self.dtype, self.capacity, self.threads, self.shard = dtype, capacity, threads, shard
        self.missing, self.weights = missing, weights
        self.engine = self._new_engine()
        self.instance = uuid.uuid4().hex
        with warnings.catch_warnings():  # Ray 2.60 warns from inside this property
            warnings.simplefilter("ignore")
            self.recovered = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.staged = None
        self.busy = 0.0  # seconds inside Engine.step/run
        self.calls = 0
        self.rows = 0
        warm = self._new_engine(capacity=2)  # load the cached kernels before the first real call
        warm.step([0], np.zeros((1, self.model.input_size), warm.dtype))

    def _new_engine(self, capacity=None):
        # The driver checks input (check_finite=False here), except for the NaN of a missing-value
        # policy, which the shard's own scan finds.
        return self._Engine(self.model, dtype=self.dtype, capacity=capacity or self.capacity,
                            threads=self.threads, check_finite=self.missing != "refuse",
                            missing=self.missing, weights=self.weights)

    def hello(self):
        return (self.instance, os.getpid(), self.recovered)

    def step(self, keys, x):
        if self.recovered:
            return _Recovered(self.instance)
        t = time.perf_counter()
        out = self.engine.step(keys, x)
        self.busy += time.perf_counter() - t
        self.calls += 1
        self.rows += len(x)
        return out

    def call(self, verb, *args):
        if self.recovered:
            return _Recovered(self.instance)
        if verb == "run":
            t = time.perf_counter()
            out = self.engine.run(*args)
            self.busy += time.perf_counter() - t
            self.calls += 1
            self.rows += len(out)
            return out
        if verb == "contains":
            return args[0] in self.engine
        if verb == "len":
            return len(self.engine)
        if verb == "keys":
            return self.engine.keys()
        if verb in ("open", "reset", "close", "state", "set_state", "last_observed"):
            return getattr(self.engine, verb)(*args)
        if verb == "stats":
            return {"calls": self.calls, "rows": self.rows, "engine_seconds": self.busy,
                    "streams": len(self.engine), "pid": os.getpid(), "rss_bytes": _rss(),
                    "engine": self.engine.stats()}
        raise ValueError(f"verb: expected a shard verb, got {verb!r}")

    def export(self, keys):
        """States of ``keys`` (all open here), (len(keys), state_size), each followed by the
        stream's last observed values (input_size more columns) under ``missing="last"``."""
        if self.recovered:
            return _Recovered(self.instance)
        S = self.model.state_size
        last = self.missing == "last"
        out = np.empty((len(keys), S + (self.model.input_size if last else 0)), self.engine.dtype)
        for i, k in enumerate(keys):
            out[i, :S] = self.engine.state(k)
            if last:
                out[i, S:] = self.engine.last_observed(k)
        return out

    def import_states(self, keys, states):
        """Open (or overwrite) ``keys`` with rows of :meth:`export`."""
        if self.recovered:
            return _Recovered(self.instance)
        S = self.model.state_size
        for k, s in zip(keys, states):
            self.engine.set_state(k, s[:S])
            if s.shape[0] > S:
                self.engine.set_last_observed(k, s[S:])
        return len(keys)

    def close_many(self, keys):
        if self.recovered:
            return _Recovered(self.instance)
        for k in keys:
            if k in self.engine:
                self.engine.close(k)
        return len(keys)

    def save(self, path):
        if self.recovered:
            return _Recovered(self.instance)
        self.engine.save_state(path)
        return len(self.engine)

    def _load(self, files, shards, saved_shards):
        """A new Engine holding this shard's keys from a snapshot of ``saved_shards`` files."""
        from ..formats import load_state

        fp, size = self.model.fingerprint, self.model.state_size
        if saved_shards == shards:  # same count, same placement: this shard's own file
            eng = self._new_engine()
            eng.load_state(files[self.shard])
            return eng
        eng = self._new_engine()
        for f in files:
            keys, states, last = load_state(f, fp, size, with_last=True)
            if not keys:
                continue
            if self.missing == "last" and last is not None:  # as Engine.load_state
                states = np.concatenate([states, last], axis=1)
            finite = np.isfinite(states).all(axis=1)
            if not finite.all():  # as Engine.load_state: refused, naming the keys
                bad = [keys[i] for i in np.flatnonzero(~finite)]
                raise NonFiniteError(f"{f}: expected finite states, got NaN/inf in the states of "
                                     f"key(s) {', '.join(repr(k) for k in bad[:10])}", bad)
            ks = np.array(keys, np.int64) if not isinstance(keys[0], str) else keys
            for i in np.flatnonzero(owners(ks, shards) == self.shard):
                eng.set_state(keys[i], states[i, :size])
                if states.shape[1] > size:
                    eng.set_last_observed(keys[i], states[i, size:])
        return eng

    def prepare_load(self, files, shards, saved_shards):
        if self.recovered:
            return _Recovered(self.instance)
        self.staged = self._load(files, shards, saved_shards)
        return len(self.staged)

    def commit_load(self, commit):
        if self.recovered:
            return _Recovered(self.instance)
        if commit and self.staged is not None:
            self.engine = self.staged
        self.staged = None
        return len(self.engine)

    def recover(self, files, shards, saved_shards, shard):
        """Restore a restarted actor from the restore point (no-op for one that did not restart)."""
        if not self.recovered:
            return {"instance": self.instance, "restarted": False, "restored": None}
        self.shard = shard
        self.engine = self._load(files, shards, saved_shards) if files else self._new_engine()
        self.recovered = False
        return {"instance": self.instance, "restarted": True, "restored": len(self.engine),
                "pid": os.getpid()}


_REMOTE = None


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("streamgru.cluster needs Ray: pip install 'streamgru[ray]'") from None
    return ray


def start_local_ray(num_cpus=None, **kwargs):
    """Start a single-machine Ray whose processes talk over 127.0.0.1 only.

    Ray otherwise binds its services to the machine's network address. Use this for tests,
    benchmarks and one-machine deployments; ``kwargs`` go to ``ray.init``. Must be called before
    any other ``ray.init`` in this process.

    Examples
    --------
    >>> from streamgru.cluster import start_local_ray
    >>> start_local_ray(num_cpus=2)        # doctest: +SKIP
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
    ray = _ray()
    from ray._private import ray_constants

    # Ray resolves "this node's address" with this flag: off means the loopback address.
    ray_constants.ENABLE_RAY_CLUSTER = False
    kwargs.setdefault("include_dashboard", False)
    return ray.init(num_cpus=num_cpus, **kwargs)


def _remote_shard():
    global _REMOTE
    if _REMOTE is None:
        _REMOTE = _ray().remote(_Shard)
    return _REMOTE


# ----------------------------------------------------------------------------------------------
# the driver


class ShardedEngine:
    """Stateful multi-stream GRU inference with the streams sharded across Ray actors.

    Parameters
    ----------
    model : GRUModel
        Shipped once to each actor as native model-file bytes (no pickled Python objects).
        Refused before any actor starts if ``Engine`` would refuse it (an LSTM layer, for now).
    shards : int
        Number of actors, each holding an ``Engine`` for its share of the keys.
    address : str, optional
        Ray cluster to join (``"auto"``, ``"ray://host:10001"``...). If Ray is not initialized,
        ``ray.init(address=address)`` is called (``address=None`` starts a local Ray); an already
        initialized Ray is used as it is. The engine never shuts Ray down.
    dtype : {"float32", "float64"}
    threads_per_shard : int
        Numba threads per actor's engine; also the CPUs each actor asks Ray for, unless
        ``actor_options`` says otherwise.
    capacity : int
        Initial state slots per shard (they grow).
    check_finite : bool
        Refuse NaN/inf inputs (checked in the driver, before any shard is touched).
    missing : {"refuse", "skip", "zero", "last"}
        What a NaN in the input does, as ``Engine(missing=...)``: the driver refuses inf (and,
        under "refuse", NaN); each shard applies the policy to its rows. ``last_observed(key)``
        reads a stream's memory; ``resize`` moves it with the stream; snapshots carry it.
    weights : {None, "float32", "float16", "int8", "float64"}
        How every shard's engine stores the weight matrices, as ``Engine(weights=...)``;
        ``self.weights`` is the form in use. Snapshots do not depend on it.
    checkpoint_dir : str or path, optional
        Where ``checkpoint()`` writes snapshots (see ``save_state``). On a cluster, a directory
        every node sees at the same path.
    checkpoint_every : float, optional
        Seconds between automatic checkpoints by a background thread (skipped when nothing
        changed). Needs ``checkpoint_dir``.
    max_restarts : int
        Ray restarts per actor before its shard is given up.
    actor_options : dict, optional
        Extra ``ActorClass.options(...)`` (e.g. ``{"num_cpus": 0}`` to pack more shards than CPUs,
        or a ``scheduling_strategy``). Default: ``num_cpus=threads_per_shard``, ``"SPREAD"``.
    start_timeout : float
        Seconds to wait for the actors to start (too few CPUs makes Ray wait forever).

    Notes
    -----
    Verbs and their state policy are those of ``Engine`` (see the module docstring for placement,
    failures and snapshots). ``len``, ``keys()`` and ``in`` ask the shards. Calls from several
    threads are safe; ``resize``, ``save_state``, ``load_state`` and ``checkpoint`` hold a lock
    that makes other calls wait. Call ``shutdown()`` (or use ``with``) to stop the actors.

    Examples
    --------
    >>> import numpy as np, ray                                         # doctest: +SKIP
    >>> from streamgru import GRUModel
    >>> from streamgru.cluster import ShardedEngine
    >>> ray.init(num_cpus=2, include_dashboard=False)                   # doctest: +SKIP
    >>> eng = ShardedEngine(GRUModel.random(3, 8), shards=2)            # doctest: +SKIP
    >>> fut = eng.step_async(np.arange(4), np.ones((4, 3), np.float32))  # doctest: +SKIP
    >>> fut.result().shape, len(eng)                                    # doctest: +SKIP
    ((4, 8), 4)
    >>> eng.resize(3)                                                   # doctest: +SKIP
    >>> eng.shutdown()                                                  # doctest: +SKIP
    """

    def __init__(self, model, shards=2, address=None, dtype="float32", threads_per_shard=1,
                 capacity=1024, check_finite=True, checkpoint_dir=None, checkpoint_every=None,
                 max_restarts=3, actor_options=None, start_timeout=120.0, missing="refuse",
                 weights=None):
        if not isinstance(model, GRUModel):
            raise TypeError(f"model: expected a streamgru.GRUModel, got {type(model).__name__}")
        check_runnable(model)  # here, not inside an actor, where it would surface as a lost shard
        check_missing(missing, check_finite)
        shards = positive_int(shards, "shards")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
        weights = weights_form(dtype, weights, model.stored_as)  # here, not inside an actor
        threads_per_shard = positive_int(threads_per_shard, "threads_per_shard")
        capacity = positive_int(capacity, "capacity")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < -1:
            raise ValueError(f"max_restarts: expected an int >= -1 (-1: unlimited), got "
                             f"{max_restarts!r}")
        if checkpoint_every is not None:
            if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float)) \
                    or not checkpoint_every > 0:
                raise ValueError(f"checkpoint_every: expected seconds > 0 or None, got "
                                 f"{checkpoint_every!r}")
            if checkpoint_dir is None:
                raise ValueError("checkpoint_every: expected checkpoint_dir to be set, got "
                                 "checkpoint_dir=None")
        if actor_options is not None and not isinstance(actor_options, dict):
            raise TypeError(f"actor_options: expected a dict, got {type(actor_options).__name__}")
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False)
        from ..formats import model_to_bytes

        self.model = model
        self.dtype = np.dtype(dtype)
        self.threads_per_shard = threads_per_shard
        self.check_finite = bool(check_finite)
        self.missing = missing
        self.weights = weights
        self.checkpoint_dir = None if checkpoint_dir is None else os.path.abspath(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.max_restarts = max_restarts
        self._capacity = capacity
        self._start_timeout = float(start_timeout)
        self._opts = {"num_cpus": threads_per_shard, "scheduling_strategy": "SPREAD",
                      **(actor_options or {}), "max_restarts": max_restarts, "max_task_retries": 0}
        # Passed by value: Ray keeps actor-creation arguments for restarts (an ObjectRef argument
        # would have to outlive every restart).
        self._model_bytes = model_to_bytes(model)
        self._lock = threading.RLock()
        self._kind = None
        self._actors, self._instance, self._dirty, self._pids = [], [], [], []
        self._restore = None  # (files, saved_shards, time) of the restore point
        self._losses = []  # every _Loss, in order
        self._pending = []  # ShardLostErrors met by the checkpoint thread, raised by the next call
        self._closed = False
        self._add_actors(range(shards))
        self._stop = threading.Event()
        self._thread = None
        if checkpoint_every is not None:
            self._thread = threading.Thread(target=_checkpoint_loop,
                                            args=(weakref.ref(self), self._stop, checkpoint_every),
                                            name="streamgru-checkpoint", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------------
    # actors

    def _add_actors(self, ids):
        ray = _ray()
        cls = _remote_shard().options(**self._opts)
        new = [cls.remote(self._model_bytes, self.dtype.name, self._capacity, self.threads_per_shard, i,
                          self.missing, self.weights) for i in ids]
        try:
            hello = ray.get([a.hello.remote() for a in new], timeout=self._start_timeout)
        except Exception as exc:
            for a in new:
                ray.kill(a, no_restart=True)
            if isinstance(exc, ray.exceptions.GetTimeoutError):
                raise RuntimeError(
                    f"shards: expected {len(new)} actor(s) to start within {self._start_timeout:g} s, "
                    f"got none ready; each asks Ray for {self._opts.get('num_cpus')} CPU(s): give Ray "
                    f"more CPUs or pass actor_options={{'num_cpus': 0}}") from None
            raise
        for a, (inst, pid, _) in zip(new, hello):
            self._actors.append(a)
            self._instance.append(inst)
            self._pids.append(pid)
            self._dirty.append(set())

    @property
    def shards(self):
        """The number of shards."""
        return len(self._actors)

    def pids(self):
        """Process id of each shard's actor (as last seen by the driver)."""
        return list(self._pids)

    def actors(self):
        """Each shard's Ray actor handle (for monitoring and failure tests)."""
        return list(self._actors)

    def _live(self):
        if self._closed:
            raise RuntimeError("engine: expected a running ShardedEngine, got one that was shut down")
        if self._pending:
            raise self._pending.pop(0)

    # ------------------------------------------------------------------------------------------
    # stepping

    def step(self, keys, x):
        """Advance each listed stream by one step; outputs in input order.

        Parameters
        ----------
        keys : sequence of int or str, or 1-D integer array, length n
            Unknown keys are opened with zero state; a repeated key is stepped once per occurrence,
            in order (all its rows go to one shard).
        x : array_like, (n, input_size)

        Returns
        -------
        numpy.ndarray, (n, output_size)

        Raises
        ------
        ShardLostError
            A shard holding some of these keys was lost; see the module docstring.
        NonFiniteError
            A shard refused its rows because a result would hold NaN/inf; rows of other shards
            may have been applied (``error.applied``); see the module docstring.
        """
        return self.step_async(keys, x).result()

    def step_async(self, keys, x):
        """Like ``step`` but returns at once with a :class:`StepFuture`.

        Several batches may be in flight: each shard runs its parts in submission order, so
        ``step_async(k, x1)`` then ``step_async(k, x2)`` steps ``k`` with x1 then x2. Wait with
        ``fut.result()`` or ``await fut``.
        """
        with self._lock:
            self._live()
            ks, kind = self._keys(keys)
            n = len(ks)
            x = self._matrix(x, "x", n, "len(keys)")
            if self.check_finite and n and not np.isfinite(x).all() \
                    and (self.missing == "refuse" or np.isinf(x).any()):
                # Under a missing-value policy a NaN is no fault (the shards apply the policy):
                # only rows holding inf are refused.
                rows = np.flatnonzero(~np.isfinite(x).all(axis=1) if self.missing == "refuse"
                                      else np.isinf(x).any(axis=1))
                bad = list(dict.fromkeys(ks[i] for i in rows.tolist()))
                raise NonFiniteError(
                    f"x: expected finite values, got NaN/inf in the rows of key(s) "
                    f"{', '.join(repr(k) for k in bad[:10])}{' ...' if len(bad) > 10 else ''}; "
                    f"no stream was changed (check_finite=False skips this check)", bad)
            if kind is not None:
                self._kind = kind
            N = len(self._actors)
            own = owners(ks, N)
            parts = []
            if N == 1 or n == 0:
                groups = [(0, None)] if n else []
            else:
                order = np.argsort(own, kind="stable")
                bounds = np.searchsorted(own[order], np.arange(N + 1))
                groups = [(s, order[bounds[s]:bounds[s + 1]]) for s in range(N)
                          if bounds[s + 1] > bounds[s]]
            for s, rows in groups:
                if rows is None:
                    sk, sx = ks, x
                elif isinstance(ks, np.ndarray):
                    sk, sx = ks[rows], x[rows]
                else:
                    sk, sx = [ks[i] for i in rows], x[rows]
                self._dirty[s].update(sk.tolist() if isinstance(sk, np.ndarray) else sk)
                parts.append((s, self._instance[s], self._actors[s].step.remote(sk, sx), rows, sk))
        return StepFuture(self, n, parts)

    def _collect(self, n, parts, timeout):
        """Wait for a step's parts; returns (outputs, None) or (None, error)."""
        ray = _ray()
        refs = [p[2] for p in parts]
        try:
            vals = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"timeout: expected the step within {timeout} s, got no answer yet "
                               f"(the future stays valid: call result() again)") from None
        except Exception:
            vals = None
        out = np.empty((n, self.model.output_size), self.dtype)
        if vals is not None and not any(type(v) is _Recovered for v in vals):
            for (_, _, _, rows, _), v in zip(parts, vals):
                if rows is None:
                    out = v if v.flags.writeable else v.copy()  # Ray hands out read-only views
                else:
                    out[rows] = v
            return out, None
        # slow path: find which parts failed and why
        applied = np.zeros(n, bool)
        out[:] = np.nan
        lost = []
        refused = []  # NonFiniteErrors: those shards changed nothing, the others applied
        for s, inst, ref, rows, _ in parts:
            try:
                v = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = _cause(exc)
                if not isinstance(cause, NonFiniteError):
                    return None, cause
                refused.append(cause)
                continue
            except ray.exceptions.RayActorError as exc:
                lost.append((s, inst, exc))
                continue
            if type(v) is _Recovered:
                lost.append((s, inst, None))
                continue
            sel = slice(None) if rows is None else rows
            out[sel] = v
            applied[sel] = True
        losses = [self._handle_loss(s, inst, exc) for s, inst, exc in lost]
        for loss, (_, _, exc) in zip(losses, lost):
            if loss is None:
                return None, exc or RuntimeError("shard: expected an answer, got none")
        if losses:
            return None, self._loss_error(losses, out, applied)
        return None, _partial_refusal(refused, out, applied)

    def run(self, key, xs):
        """Advance one stream over a sequence ``xs`` (T, input_size) -> (T, output_size)."""
        with self._lock:
            self._live()
            k = self._key(key)
            xs = self._matrix(xs, "xs", None, None)
            s = self._shard(k)
            self._dirty[s].add(k)
            out = np.array(self._call(s, "run", k, xs))  # a writable copy, as Engine.run returns
            if self._kind is None:
                self._kind = type(k)
            return out

    # ------------------------------------------------------------------------------------------
    # stream lifecycle

    def open(self, key, state=None):
        """Open a new stream (zero state, or ``state``); KeyError if already open."""
        self._one("open", key, True, state)

    def reset(self, key):
        """Set an open stream's state to zeros; KeyError if unknown."""
        self._one("reset", key, True)

    def close(self, key):
        """Forget a stream; KeyError if unknown."""
        self._one("close", key, True)

    def state(self, key):
        """A copy of the stream's state, ``(state_size,)``; KeyError if unknown."""
        return np.array(self._one("state", key, False))

    def set_state(self, key, state):
        """Overwrite a stream's state (opens the key if unknown)."""
        self._one("set_state", key, True, state)

    def last_observed(self, key):
        """A copy of the stream's last observed input values, ``(input_size,)``
        (``missing="last"`` only, as ``Engine.last_observed``); KeyError if unknown."""
        if self.missing != "last":
            raise ValueError(f"missing: expected an engine made with missing='last' (only it "
                             f"keeps last observed values), got missing={self.missing!r}")
        return np.array(self._one("last_observed", key, False))

    def __contains__(self, key):
        try:
            k = normalize_key(key)
        except (TypeError, ValueError):
            return False
        with self._lock:
            self._live()
            if self._kind is not None and not isinstance(k, self._kind):
                return False
            return self._call(self._shard(k), "contains", k)

    def __len__(self):
        with self._lock:
            self._live()
            return sum(self._all("len"))

    def keys(self, shard=None):
        """The open stream keys of every shard (or of shard ``shard``), as a list, in no order."""
        with self._lock:
            self._live()
            if shard is not None:
                if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) \
                        or not 0 <= shard < len(self._actors):
                    raise ValueError(f"shard: expected an int from 0 to {len(self._actors) - 1}, got "
                                     f"{shard!r}")
                return self._call(int(shard), "keys")
            return [k for part in self._all("keys") for k in part]

    def stats(self):
        """Per shard (a list, by shard number): engine calls, rows, seconds inside the engine,
        streams, pid, resident bytes, and ``engine``: that shard's ``Engine.stats()`` (counted
        since the shard's engine was built: a restore, load or resize starts it again).
        ``streamgru.metrics.serve(sharded_engine, port)`` serves them with a ``shard`` label."""
        with self._lock:
            self._live()
            return self._all("stats")

    def check(self):
        """Ask every shard; raise :class:`ShardLostError` if one was lost (for monitoring)."""
        len(self)

    def _one(self, verb, key, mutates, *args):
        with self._lock:
            self._live()
            k = self._key(key)
            s = self._shard(k)
            out = self._call(s, verb, k, *args)
            if mutates:
                self._dirty[s].add(k)
                if verb in ("open", "set_state") and self._kind is None:
                    self._kind = type(k)
            return out

    def _keys(self, keys):
        """A validated batch of keys (as ``Engine`` validates them) and its kind: int keys as an
        int64 array (placement and the split over shards are vectorised), str keys as a list."""
        ks, kind = normalize_keys(keys, self._kind, "keys")
        if kind is int and not isinstance(ks, np.ndarray):
            ks = np.array(ks, dtype=np.int64)
        return ks, kind

    def _key(self, key):
        k = normalize_key(key, "key")
        check_kind([k], self._kind, "key")  # as Engine's one-key verbs
        return k

    def _shard(self, k):
        return int(owners([k], len(self._actors))[0])

    def _call(self, s, verb, *args):
        return self._gather([(s, self._actors[s].call.remote(verb, *args))])[0]

    def _all(self, verb):
        return self._gather([(s, a.call.remote(verb)) for s, a in enumerate(self._actors)])

    def _gather(self, calls):
        """ray.get each (shard, ref); user errors re-raised as themselves, losses as ShardLostError."""
        ray = _ray()
        insts = {s: self._instance[s] for s, _ in calls}
        vals, lost = [], []
        for s, ref in calls:
            try:
                v = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                raise _cause(exc) from None
            except ray.exceptions.RayActorError as exc:
                lost.append((s, exc))
                vals.append(None)
                continue
            if type(v) is _Recovered:
                lost.append((s, None))
            vals.append(v)
        if lost:
            losses = [self._handle_loss(s, insts[s], exc) for s, exc in lost]
            for loss, (_, exc) in zip(losses, lost):
                if loss is None:
                    raise exc or RuntimeError("shard: expected an answer, got none")
            raise self._loss_error(losses, None, None)
        return vals

    # ------------------------------------------------------------------------------------------
    # failures

    def _handle_loss(self, s, inst, exc):
        """Restore shard ``s`` if it restarted since ``inst``; return the _Loss describing it."""
        ray = _ray()
        with self._lock:
            for loss in self._losses:
                if loss.shard == s and loss.old_instance == inst:
                    return loss  # another call already restored it
            files, saved, rtime = self._restore or (None, None, None)
            keys = sorted(self._dirty[s], key=_sort_key) if s < len(self._dirty) else []
            if s >= len(self._actors):  # removed by a resize meanwhile
                return None
            deadline = time.monotonic() + self._start_timeout
            while True:
                try:
                    info = ray.get(self._actors[s].recover.remote(files, len(self._actors), saved, s),
                                   timeout=max(deadline - time.monotonic(), 1.0))
                    break
                except ray.exceptions.ActorUnavailableError as err:  # restarting: ask again
                    if time.monotonic() < deadline:
                        time.sleep(0.1)
                        continue
                    failure = err
                except Exception as err:  # died for good, or the restore failed
                    failure = err
                loss = _Loss(s, inst, keys, rtime, True, failure)  # the shard stays lost
                self._losses.append(loss)
                return loss
            if not info["restarted"]:
                if info["instance"] != inst:  # restarted and restored by someone else earlier
                    for loss in self._losses:
                        if loss.shard == s and loss.old_instance == inst:
                            return loss
                return None  # not restarted: a transient failure of this call, re-raised as is
            self._instance[s] = info["instance"]
            self._pids[s] = info.get("pid", self._pids[s])
            self._dirty[s] = set()
            loss = _Loss(s, inst, keys, rtime, False, exc)
            self._losses.append(loss)
            return loss

    def _loss_error(self, losses, outputs, applied):
        for loss in losses:
            loss.reported = True
        lost = {}
        for loss in losses:
            lost.setdefault(loss.shard, [])
            lost[loss.shard] += [k for k in loss.keys if k not in lost[loss.shard]]
        rtime = {loss.shard: loss.restore_time for loss in losses}
        permanent = any(loss.permanent for loss in losses)
        parts = []
        for s in sorted(lost):
            ks = lost[s]
            shown = ", ".join(repr(k) for k in ks[:10]) + (f" ... (+{len(ks) - 10} more)"
                                                           if len(ks) > 10 else "")
            when = ("nothing (it restarted empty)" if rtime[s] is None else
                    f"the restore point of {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rtime[s]))}")
            parts.append(f"shard {s}: {len(ks)} stream(s) [{shown}] went back to {when}")
        what = "died and was restarted"
        if permanent:
            causes = "; ".join(f"shard {x.shard}: {type(x.cause).__name__}: {str(x.cause)[:300]}"
                               for x in losses if x.permanent)
            what = f"could not be restarted ({causes})"
        msg = (f"shard(s) {sorted(lost)} {what}; " + "; ".join(parts) +
               ". Streams opened since then are gone, streams closed since then are back; replay "
               "their events since then (error.keys, error.restore_time) or reset them.")
        if applied is not None:
            msg += f" Of this step, {int(applied.sum())} of {len(applied)} rows (other shards) were applied."
        return ShardLostError(msg, lost, rtime, permanent, outputs, applied)

    # ------------------------------------------------------------------------------------------
    # resize

    def resize(self, shards):
        """Change the number of shards, moving exactly the streams whose placement changes.

        Each moving stream's state is read from its old shard, written to its new one, then
        closed on the old one. Other calls wait meanwhile (a driver lock). Steps already submitted
        with ``step_async`` finish on the old placement first (a shard runs calls in order).
        If a shard is lost before the states are written, nothing changes; afterwards the new
        placement stands and the loss is reported as usual. With ``checkpoint_dir`` set, a
        checkpoint is taken at the end.

        Returns
        -------
        int : the number of streams moved.
        """
        n = positive_int(shards, "shards")
        ray = _ray()
        with self._lock:
            self._live()
            old = len(self._actors)
            if n == old:
                return 0
            listing = self._all("keys")
            moving = []  # per old shard: (keys list, new owners array)
            for s, ks in enumerate(listing):
                if not ks:
                    moving.append(([], np.zeros(0, np.int64)))
                    continue
                arr = ks if isinstance(ks[0], str) else np.array(ks, np.int64)
                own = owners(arr, n)
                idx = np.flatnonzero(own != s)
                moving.append(([ks[i] for i in idx], own[idx]))
            if n > old:
                self._add_actors(range(old, n))
            dest = {}  # new shard -> (keys, [state arrays], [old shard of each key])
            try:
                states = self._gather([(s, self._actors[s].export.remote(mk))
                                       for s, (mk, _) in enumerate(moving) if mk])
                for (s, (mk, own)), st in zip([(s, m) for s, m in enumerate(moving) if m[0]], states):
                    for t in np.unique(own).tolist():
                        sel = np.flatnonzero(own == t)
                        d = dest.setdefault(t, ([], [], []))
                        d[0].extend(mk[i] for i in sel)
                        d[1].append(st[sel])
                        d[2].extend([s] * len(sel))
                self._gather([(t, self._actors[t].import_states.remote(k, np.concatenate(st)))
                              for t, (k, st, _) in dest.items()])
            except BaseException:
                # nothing was closed on the old shards: undo the copies, drop new actors
                for t, (k, _, _) in dest.items():
                    if t < old:
                        try:
                            ray.get(self._actors[t].close_many.remote(k))
                        except Exception:
                            pass
                self._drop_actors(old)
                raise
            # commit: new placement from here on
            old_dirty = self._dirty
            victims = self._actors[n:]
            self._actors, self._instance = self._actors[:n], self._instance[:n]
            self._pids, self._dirty = self._pids[:n], [set(d) for d in old_dirty[:n]]
            for t, (k, _, src) in dest.items():
                # a moved stream differs from the restore point iff it did on its old shard
                # (restores re-place keys); with no restore point every stream counts
                self._dirty[t].update(key for key, s in zip(k, src)
                                      if self._restore is None or key in old_dirty[s])
            for s in range(min(old, n)):
                self._dirty[s].difference_update(moving[s][0])
            try:
                self._gather([(s, self._actors[s].close_many.remote(moving[s][0]))
                              for s in range(min(old, n)) if moving[s][0]])
            finally:
                for a in victims:
                    ray.kill(a, no_restart=True)
                if self.checkpoint_dir is not None:
                    self._checkpoint_locked(force=True)
            return sum(len(m[0]) for m in moving)

    def _drop_actors(self, keep):
        ray = _ray()
        for a in self._actors[keep:]:
            ray.kill(a, no_restart=True)
        del self._actors[keep:], self._instance[keep:], self._pids[keep:], self._dirty[keep:]

    # ------------------------------------------------------------------------------------------
    # snapshots and checkpoints

    def save_state(self, directory):
        """Write every stream to ``directory``: one atomic file per shard, then ``manifest.json``.

        Returns the manifest (a dict). Files of the manifest this one replaces are deleted.

        Examples
        --------
        >>> eng.save_state("snap")             # doctest: +SKIP
        >>> other = ShardedEngine(model, shards=3)  # doctest: +SKIP
        >>> other.load_state("snap")           # doctest: +SKIP
        """
        with self._lock:
            self._live()
            return self._save_locked(directory)

    def _save_locked(self, directory):
        d = Path(os.path.abspath(directory))
        d.mkdir(parents=True, exist_ok=True)
        previous = None
        try:
            previous = _read_manifest(d)
        except (FileNotFoundError, FormatError):
            pass
        snap = uuid.uuid4().hex[:12]
        N = len(self._actors)
        names = [f"shard-{i:04d}-of-{N:04d}.{snap}.sgst" for i in range(N)]
        t0 = time.time()
        counts = self._gather([(i, a.save.remote(str(d / f))) for i, (a, f)
                               in enumerate(zip(self._actors, names))])
        manifest = {
            "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "placement": PLACEMENT,
            "model_fingerprint": self.model.fingerprint, "dtype": self.dtype.name,
            "state_size": self.model.state_size,
            "key_kind": None if self._kind is None else self._kind.__name__,
            "shards": N, "count": int(sum(counts)), "time": t0,
            "files": [{"shard": i, "file": f, "count": int(c)}
                      for i, (f, c) in enumerate(zip(names, counts))],
        }
        from ..formats import write_atomic

        write_atomic(d / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        if previous is not None:
            keep = set(names)
            for entry in previous["files"]:
                f = entry["file"]
                if f not in keep and "/" not in f and f.startswith("shard-") and f.endswith(".sgst"):
                    try:
                        (d / f).unlink()
                    except FileNotFoundError:
                        pass
        return manifest

    def load_state(self, directory):
        """Replace every stream by those of a ``save_state`` snapshot, made with any shard count.

        Keys are re-placed for the current shard count. On any error nothing changes. The
        snapshot becomes the restore point (and a checkpoint is taken if ``checkpoint_dir`` is
        set and is another directory).
        """
        d = Path(os.path.abspath(directory))
        m = _read_manifest(d)
        if m["model_fingerprint"] != self.model.fingerprint:
            raise FormatError(f"{d}: expected a snapshot of model {self.model.fingerprint[:16]}..., "
                              f"got one of model {str(m['model_fingerprint'])[:16]}...")
        files = [str(d / e["file"]) for e in m["files"]]
        for f in files:
            if not os.path.isfile(f):
                raise FormatError(f"{d}: expected the snapshot's file {os.path.basename(f)}, got none")
        ray = _ray()
        with self._lock:
            self._live()
            N = len(self._actors)
            try:
                counts = self._gather([(i, a.prepare_load.remote(files, N, m["shards"]))
                                       for i, a in enumerate(self._actors)])
                if sum(counts) != m["count"]:
                    raise FormatError(f"{d}: expected {m['count']} streams (manifest), got "
                                      f"{sum(counts)} from its files")
            except BaseException:
                for a in self._actors:
                    try:
                        ray.get(a.commit_load.remote(False))
                    except Exception:
                        pass
                raise
            self._gather([(i, a.commit_load.remote(True)) for i, a in enumerate(self._actors)])
            self._kind = {"int": int, "str": str, None: None}[m["key_kind"]]
            self._dirty = [set() for _ in self._actors]
            self._restore = (files, m["shards"], m["time"])
            if self.checkpoint_dir is not None and Path(self.checkpoint_dir) != d:
                self._checkpoint_locked(force=True)

    def checkpoint(self):
        """Save every shard to ``checkpoint_dir`` now; it becomes the restore point.

        Returns the manifest, or None when no shard changed since the last restore point.
        """
        if self.checkpoint_dir is None:
            raise ValueError("checkpoint_dir: expected a directory (ShardedEngine(checkpoint_dir=...)), "
                             "got None")
        with self._lock:
            self._live()
            return self._checkpoint_locked(force=False)

    def _checkpoint_locked(self, force):
        if not force and self._restore is not None and not any(self._dirty):
            return None
        m = self._save_locked(self.checkpoint_dir)
        d = Path(self.checkpoint_dir)
        self._restore = ([str(d / e["file"]) for e in m["files"]], m["shards"], m["time"])
        self._dirty = [set() for _ in self._actors]
        return m

    def losses(self):
        """Every shard loss seen so far: list of dicts (shard, keys, restore_time, permanent)."""
        return [{"shard": x.shard, "keys": list(x.keys), "restore_time": x.restore_time,
                 "permanent": x.permanent} for x in self._losses]

    # ------------------------------------------------------------------------------------------
    # lifecycle

    def shutdown(self):
        """Stop the checkpoint thread and the actors (their streams are gone). Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        with self._lock:
            ray = _ray()
            for a in self._actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:
                    pass
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __repr__(self):
        state = "shut down" if self._closed else f"shards={len(self._actors)}"
        return (f"ShardedEngine({self.model!r}, {state}, dtype={self.dtype.name!r}, "
                f"weights={self.weights!r}, threads_per_shard={self.threads_per_shard})")

    # ------------------------------------------------------------------------------------------

    def _matrix(self, x, what, n, n_what):
        return float_matrix(x, what, n, n_what, self.model.input_size, self.dtype)


def _rss():
    """Resident memory of this process in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _partial_refusal(refused, outputs, applied):
    """One NonFiniteError for a step that some shards refused (a result would have held NaN/inf;
    those shards changed nothing) while the other shards applied their rows: a Ray call per shard
    cannot be undone atomically, so the error says which rows were applied, as ShardLostError
    does."""
    if len(refused) == 1 and not applied.any():
        return refused[0]  # nothing was applied anywhere: the plain all-or-nothing refusal
    keys = list(dict.fromkeys(k for e in refused for k in e.keys))
    done = int(applied.sum())
    err = NonFiniteError(
        f"x: expected a step whose states and outputs stay finite, got NaN/inf for key(s) "
        f"{', '.join(repr(k) for k in keys[:10])}{' ...' if len(keys) > 10 else ''}; their "
        f"shard(s) changed nothing, but {done} row(s) on other shards were applied "
        f"(error.applied, error.outputs): resend only the rows not applied, without these keys",
        keys)
    err.applied = applied
    err.outputs = outputs
    return err


def _cause(exc):
    """The user's exception inside a RayTaskError (KeyError, ValueError...), else the error."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _sort_key(k):
    return (isinstance(k, str), k)


# A manifest lists ~100 bytes per shard: a larger file is not one (and is not read into memory).
MANIFEST_MAX_BYTES = 64 << 20


def _read_manifest(d):
    p = Path(d) / MANIFEST_NAME
    try:
        size = p.stat().st_size
        if size > MANIFEST_MAX_BYTES:
            raise FormatError(f"{p}: expected a manifest of at most {MANIFEST_MAX_BYTES} bytes, "
                              f"got {size}")
        m = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"directory: expected a snapshot with {MANIFEST_NAME}, got none in "
                                f"{str(d)!r}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{p}: expected JSON, got unreadable text ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise FormatError(f"{p}: expected a {MANIFEST_FORMAT} manifest, got "
                          f"{m.get('format') if isinstance(m, dict) else type(m).__name__!r}")
    if m.get("format_version") != MANIFEST_VERSION:
        raise FormatError(f"{p}: expected format_version {MANIFEST_VERSION!r}, got "
                          f"{m.get('format_version')!r}")
    if m.get("placement") != PLACEMENT:
        raise FormatError(f"{p}: expected placement {PLACEMENT!r}, got {m.get('placement')!r}")
    try:
        files = m["files"]
        if len(files) != int(m["shards"]) or any(e["shard"] != i for i, e in enumerate(files)):
            raise ValueError("files do not list shards 0..shards-1 in order")
        for e in files:
            if not isinstance(e["file"], str) or "/" in e["file"] or "\\" in e["file"]:
                raise ValueError(f"file name {e['file']!r}")
        int(m["count"])
        float(m["time"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{p}: expected a consistent manifest, got {type(exc).__name__}: {exc}") \
            from None
    return m


def _checkpoint_loop(ref, stop, every):
    """Background checkpoints; holds only a weak reference so a dropped engine can be collected."""
    while not stop.wait(every):
        eng = ref()
        if eng is None or eng._closed:
            return
        try:
            with eng._lock:
                if not eng._closed:
                    eng._checkpoint_locked(force=False)
        except ShardLostError as exc:
            with eng._lock:
                eng._pending.append(exc)
            warnings.warn(f"streamgru checkpoint: {exc}", RuntimeWarning, stacklevel=1)
        except Exception as exc:  # keep checkpointing; the next call still works
            warnings.warn(f"streamgru checkpoint failed: {type(exc).__name__}: {exc}", RuntimeWarning,
                          stacklevel=1)
        del eng
