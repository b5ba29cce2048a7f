"""Several threads calling step/run/reset/state/save_state on overlapping keys at once.

The engine serializes calls with one lock. To know the order in which calls were serialized, the
test swaps that lock for a counting one: the outermost acquisition of each call takes the next
sequence number, inside the engine's critical section. Replaying every call serially in that order
on a fresh engine of the same configuration must reproduce every output, every state read, every
snapshot, every eviction and the final states bit for bit. (The reference here is a serial replay
of the same engine on purpose: what is tested is that concurrency equals serialization; numerics
against the oracle are tested elsewhere.)
"""

import itertools
import threading

import numpy as np
import pytest

from streamgru import Engine, GRUModel
from streamgru.formats import load_state

N_THREADS = 6
CALLS = 120
KEYS = 300


class CountingLock:
    """An RLock whose outermost acquisitions are numbered, in acquisition order."""

    def __init__(self):
        self._lock = threading.RLock()
        self._local = threading.local()
        self.seq = 0

    def __enter__(self):
        self._lock.acquire()
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self.seq += 1
            self._local.seq = self.seq
        self._local.depth = depth + 1
        return self

    def __exit__(self, *exc):
        self._local.depth -= 1
        self._lock.release()
        return False

    @property
    def last(self):
        return self._local.seq


def model():
    return GRUModel.random(4, [16, 8], dense_after=[(3, "softmax")], seed=11)


def make_engine(config, evicted):
    if config == "plain":
        return Engine(model())
    ticks = itertools.count()
    # A clock that advances once per reading: readings happen only under the lock, so a serial
    # replay of the same calls sees the same times.
    return Engine(model(), max_streams=200, idle_timeout=150.0, clock=lambda: float(next(ticks)),
                  on_evict=lambda k, s: evicted.append((k, s)))


def plan(seed, tmp_path):
    rng = np.random.default_rng(seed)
    calls = []
    for i in range(CALLS):
        r = rng.random()
        if r < 0.55:
            n = int(rng.choice([1, 2, 7, 16, 70]))  # 70 rows: the parallel kernel
            keys = rng.integers(0, KEYS, n).tolist()
            calls.append(("step", keys, rng.normal(size=(n, 4)).astype(np.float32)))
        elif r < 0.7:
            calls.append(("run", int(rng.integers(KEYS)),
                          rng.normal(size=(int(rng.integers(1, 30)), 4)).astype(np.float32)))
        elif r < 0.8:
            calls.append(("reset", int(rng.integers(KEYS)), None))
        elif r < 0.93:
            calls.append(("state", int(rng.integers(KEYS)), None))
        else:
            calls.append(("save_state", str(tmp_path / f"snap-{seed}-{i}"), None))
    return calls


def do(eng, verb, a, b):
    """Run one call; return ('ok', result) or ('err', exception type name)."""
    try:
        if verb == "step":
            return "ok", eng.step(a, b)
        if verb == "run":
            return "ok", eng.run(a, b)
        if verb == "reset":
            return "ok", eng.reset(a)
        if verb == "state":
            return "ok", eng.state(a)
        eng.save_state(a)
        return "ok", None
    except KeyError as exc:  # reset/state of a stream not open (yet, or evicted)
        return "err", type(exc).__name__


@pytest.mark.parametrize("config", ["plain", "lifecycle"])
def test_concurrent_calls_equal_their_serialization(tmp_path, config):
    evicted = []
    eng = make_engine(config, evicted)
    lock = CountingLock()
    eng._lock = lock
    plans = [plan(seed, tmp_path) for seed in range(N_THREADS)]
    records, rec_lock = [], threading.Lock()
    barrier = threading.Barrier(N_THREADS)
    failures = []

    def worker(calls):
        try:
            barrier.wait()
            for verb, a, b in calls:
                outcome = do(eng, verb, a, b)
                seq = lock.last  # this thread's call: set inside the engine's critical section
                with rec_lock:
                    records.append((seq, verb, a, b, outcome))
        except BaseException as exc:  # surfaced below: a thread must not die silently
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker did not finish"
    assert not failures, failures
    records.sort(key=lambda r: r[0])
    # One critical section per call: sequence numbers are exactly 1..N.
    assert [r[0] for r in records] == list(range(1, N_THREADS * CALLS + 1))

    replay_evicted = []
    ref = make_engine(config, replay_evicted)
    for seq, verb, a, b, (status, result) in records:
        status2, result2 = do(ref, verb, a, b)
        assert status2 == status, (seq, verb, a)
        if verb in ("step", "run", "state") and status == "ok":
            np.testing.assert_array_equal(result, result2, err_msg=f"call {seq} {verb}")
        elif verb == "save_state":
            keys, states = load_state(a, ref.model.fingerprint, ref.model.state_size)
            assert keys == ref.keys() if config == "lifecycle" else sorted(keys) == sorted(ref.keys())
            for k, s in zip(keys, states):
                np.testing.assert_array_equal(s, ref.state(k), err_msg=f"snapshot {seq} key {k}")
    assert sorted(eng.keys()) == sorted(ref.keys())
    for k in ref.keys():
        np.testing.assert_array_equal(eng.state(k), ref.state(k))
    assert [k for k, _ in evicted] == [k for k, _ in replay_evicted]
    for (_, s), (_, s2) in zip(evicted, replay_evicted):
        np.testing.assert_array_equal(s, s2)
    if config == "lifecycle":
        assert evicted, "the plan should have evicted some streams"
        assert len(eng) <= 200
    assert sum(r[1] == "save_state" for r in records) > 0
    assert sum(r[4][0] == "err" for r in records) > 0  # some reset/state hit closed keys
