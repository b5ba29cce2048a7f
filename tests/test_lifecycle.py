"""Stream lifecycle: max_streams (LRU eviction), idle_timeout, on_evict, with an injected clock.

The policy under test (docs/operations.md): a stream is *used* by step, run, open, set_state and
reset; reads (state, in, keys, save_state) do not count. A mutating call first evicts streams idle
for idle_timeout or longer, then the least recently used streams not named in the call until the
call's new keys fit. Evicted states go to on_evict(key, state). States are checked against the
float64 oracle, never against the engine itself.
"""

import numpy as np
import pytest
from helpers import OracleStreams, snapshot

from streamgru import Engine, GRUModel
from streamgru import engine as engine_mod

TOL = 1e-5


def model():
    return GRUModel.random(3, [5, 4], dense_after=[(2, "tanh")], seed=3)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Recorder:
    """An on_evict that records (key, state) and can be told to fail."""

    def __init__(self):
        self.got = []
        self.fail_on = set()

    def __call__(self, key, state):
        if key in self.fail_on:
            raise OSError(f"store down for {key!r}")
        self.got.append((key, state))

    @property
    def keys(self):
        return [k for k, _ in self.got]


def x(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


# --------------------------------------------------------------------------- max_streams

def test_lru_eviction_hands_final_state_to_on_evict():
    m, rec = model(), Recorder()
    ref = OracleStreams(m)
    eng = Engine(m, max_streams=3, on_evict=rec)
    for i, keys in enumerate([["a", "b", "c"], ["a"], ["b"], ["d"], ["e", "a"]]):
        xs = x(len(keys), i)
        eng.step(keys, xs)
        ref.step(keys, xs)
    # After [a,b,c], a, b: c is least recently used -> evicted for d; then e needs room: a is in
    # the batch, so b (next least recent) goes.
    assert rec.keys == ["c", "b"]
    assert sorted(eng.keys()) == ["a", "d", "e"] and len(eng) == 3
    for k, state in rec.got:
        assert state.shape == (m.state_size,) and state.dtype == np.float32
        np.testing.assert_allclose(state, ref.states[k], atol=TOL)
    for k in eng.keys():
        np.testing.assert_allclose(eng.state(k), ref.states[k], atol=TOL)


def test_keys_in_the_batch_are_never_evicted_even_if_least_recent():
    rec = Recorder()
    eng = Engine(model(), max_streams=3, on_evict=rec)
    eng.step(["a", "b", "c"], x(3))
    eng.step(["a", "a", "d", "c"], x(4))  # a is the LRU stream but is in the batch
    assert rec.keys == ["b"]
    assert eng.keys() == ["a", "d", "c"]  # LRU first; batch order sets the new recency


def test_batch_with_more_distinct_keys_than_max_streams_is_refused_before_anything_changes():
    rec = Recorder()
    eng = Engine(model(), max_streams=3, on_evict=rec)
    eng.step(["a", "b"], x(2))
    before = snapshot(eng)
    with pytest.raises(ValueError, match=r"keys: expected at most max_streams=3 distinct keys in "
                                         r"one call, got 4; split the batch"):
        eng.step(["a", "p", "q", "r"], x(4))
    assert rec.got == [] and snapshot(eng).keys() == before.keys()
    for k, s in before.items():
        np.testing.assert_array_equal(eng.state(k), s)
    eng.step(["p", "q", "p", "q", "r"], x(5))  # 3 distinct keys: fits, evicts a and b
    assert rec.keys == ["a", "b"]


def test_buffer_never_grows_past_max_streams():
    eng = Engine(model(), capacity=2, max_streams=50)
    for i in range(40):
        eng.step([f"k{j}" for j in range(i * 7, i * 7 + 7)], x(7, i))
        assert len(eng) <= 50 and eng.capacity <= 50
    assert len(eng) == 50
    assert Engine(model(), capacity=1024, max_streams=10).capacity == 10


def test_large_batch_through_the_parallel_kernel(monkeypatch):
    monkeypatch.setattr(engine_mod, "PARALLEL_MIN_ROWS", 1)
    m, rec = model(), Recorder()
    ref = OracleStreams(m)
    eng = Engine(m, max_streams=100, on_evict=rec)
    for i in range(5):
        keys = [f"k{j}" for j in range(i * 40, i * 40 + 80)]
        xs = x(80, i)
        eng.step(keys, xs)
        ref.step(keys, xs)
    assert len(eng) == 100 and len(rec.got) == 240 - 100
    for k, state in rec.got + [(k, eng.state(k)) for k in eng.keys()]:
        np.testing.assert_allclose(state, ref.states[k], atol=TOL)


def test_without_on_evict_states_are_dropped_and_engine_stays_bounded():
    eng = Engine(model(), max_streams=2)
    for k in range(10):
        eng.step([k], x(1, k))
    assert eng.keys() == [8, 9]


# --------------------------------------------------------------------------- what counts as a use

@pytest.mark.parametrize("verb", ["step", "run", "open", "set_state", "reset"])
def test_mutating_verbs_count_as_use(verb):
    rec = Recorder()
    eng = Engine(model(), max_streams=2, on_evict=rec)
    if verb == "open":
        eng.step(["b"], x(1))
        eng.open("a")
    else:
        eng.step(["a", "b"], x(2))  # a is least recent
        {"step": lambda: eng.step(["a"], x(1)),
         "run": lambda: eng.run("a", x(4)),
         "set_state": lambda: eng.set_state("a", np.ones(9)),
         "reset": lambda: eng.reset("a")}[verb]()
    eng.step(["c"], x(1))
    assert rec.keys == ["b"]


@pytest.mark.parametrize("verb", ["state", "contains", "keys", "save_state", "len"])
def test_reads_do_not_count_as_use(verb, tmp_path):
    rec = Recorder()
    eng = Engine(model(), max_streams=2, on_evict=rec)
    eng.step(["a", "b"], x(2))
    {"state": lambda: eng.state("a"), "contains": lambda: "a" in eng, "keys": eng.keys,
     "save_state": lambda: eng.save_state(tmp_path / "s"), "len": lambda: len(eng)}[verb]()
    eng.step(["c"], x(1))
    assert rec.keys == ["a"]


def test_close_does_not_call_on_evict():
    rec = Recorder()
    eng = Engine(model(), max_streams=2, on_evict=rec)
    eng.step(["a", "b"], x(2))
    eng.close("a")
    eng.step(["c"], x(1))
    assert rec.got == [] and sorted(eng.keys()) == ["b", "c"]


def test_open_and_set_state_make_room():
    rec = Recorder()
    eng = Engine(model(), max_streams=2, on_evict=rec)
    eng.open("a", np.full(9, 0.5))
    eng.set_state("b", np.full(9, 0.25))
    eng.open("c")
    eng.set_state("d", np.ones(9))
    assert rec.keys == ["a", "b"]
    np.testing.assert_array_equal(rec.got[0][1], np.full(9, 0.5, np.float32))
    with pytest.raises(KeyError, match="already open"):
        eng.open("c")  # an open key: refused, nothing evicted
    assert rec.keys == ["a", "b"] and eng.keys() == ["c", "d"]


# --------------------------------------------------------------------------- idle_timeout

def test_idle_streams_evicted_lazily_and_by_evict_idle():
    clock, rec = Clock(), Recorder()
    eng = Engine(model(), idle_timeout=10, on_evict=rec, clock=clock)
    eng.step(["a", "b"], x(2))
    clock.t += 6
    eng.step(["b"], x(1))
    clock.t += 4  # a idle exactly 10 s: due
    assert eng.evict_idle() == ["a"] and rec.keys == ["a"]
    assert eng.evict_idle() == []
    clock.t += 5.9
    eng.step(["c"], x(1))  # b idle 9.9 s: stays
    assert sorted(eng.keys()) == ["b", "c"]
    clock.t += 0.1
    eng.step(["c"], x(1))  # lazily, at the start of a mutating call
    assert rec.keys == ["a", "b"] and eng.keys() == ["c"]
    clock.t += 100
    assert eng.evict_idle() == ["c"] and len(eng) == 0
    assert Engine(model()).evict_idle() == []


def test_reads_see_expired_streams_until_the_next_mutating_call():
    clock, rec = Clock(), Recorder()
    eng = Engine(model(), idle_timeout=1, on_evict=rec, clock=clock)
    eng.step(["a"], x(1))
    clock.t += 5
    assert "a" in eng and eng.state("a").shape == (9,) and rec.got == []
    with pytest.raises(KeyError, match="unknown key 'a'"):
        eng.reset("a")  # the sweep ran first: a is gone
    assert rec.keys == ["a"]


def test_expired_key_in_the_batch_restarts_from_zeros():
    m, clock, rec = model(), Clock(), Recorder()
    eng = Engine(m, idle_timeout=10, on_evict=rec, clock=clock)
    ref = OracleStreams(m)
    eng.step(["a"], x(1, 1))
    ref.step(["a"], x(1, 1))
    clock.t += 10
    eng.step(["a"], x(1, 2))  # a expired before this call: evicted, then a new stream
    assert rec.keys == ["a"]
    np.testing.assert_allclose(rec.got[0][1], ref.states["a"], atol=TOL)
    fresh = OracleStreams(m)
    fresh.step(["a"], x(1, 2))
    np.testing.assert_allclose(eng.state("a"), fresh.states["a"], atol=TOL)


def test_idle_and_max_streams_together():
    clock, rec = Clock(), Recorder()
    eng = Engine(model(), max_streams=3, idle_timeout=10, on_evict=rec, clock=clock)
    eng.step(["a", "b", "c"], x(3))
    clock.t += 5
    eng.step(["c"], x(1))
    clock.t += 5  # a and b idle 10 s
    eng.step(["d", "e"], x(2))  # idle ones go first; no LRU eviction needed then
    assert rec.keys == ["a", "b"] and eng.keys() == ["c", "d", "e"]
    eng.step(["f"], x(1))
    assert rec.keys == ["a", "b", "c"]


def test_load_state_counts_as_use_and_keeps_lru_order(tmp_path):
    clock, rec = Clock(), Recorder()
    eng = Engine(model(), max_streams=3, idle_timeout=10, on_evict=rec, clock=clock)
    eng.step(["a", "b", "c"], x(3))
    eng.step(["a"], x(1))
    eng.save_state(tmp_path / "s")
    clock.t += 9
    other = Engine(model(), max_streams=3, idle_timeout=10, on_evict=rec, clock=clock)
    other.load_state(tmp_path / "s")
    assert other.keys() == ["b", "c", "a"]
    clock.t += 9.5  # 18.5 s after the steps, 9.5 s after the load: nothing idle
    assert other.evict_idle() == []
    other.step(["d"], x(1))
    assert rec.keys == ["b"]
    small = Engine(model(), max_streams=2)
    small.step(["z"], x(1))
    with pytest.raises(ValueError, match=r"path: expected at most max_streams=2 streams, got a "
                                         r"snapshot of 3; nothing was changed"):
        small.load_state(tmp_path / "s")
    assert small.keys() == ["z"]


# --------------------------------------------------------------------------- on_evict failures

def test_on_evict_raising_keeps_the_stream_and_the_call_does_nothing():
    m, rec = model(), Recorder()
    eng = Engine(m, max_streams=3, on_evict=rec)
    eng.step(["a", "b", "c"], x(3))
    before = snapshot(eng)
    rec.fail_on = {"b"}
    with pytest.raises(OSError, match="store down for 'b'"):
        eng.step(["d", "e"], x(2))  # evicts a (delivered), then b fails
    assert rec.keys == ["a"]
    assert eng.keys() == ["b", "c"]  # b kept, still least recent; d, e not opened
    for k in ("b", "c"):
        np.testing.assert_array_equal(eng.state(k), before[k])
    rec.fail_on = set()
    eng.step(["d", "e"], x(2))
    assert rec.keys == ["a", "b"] and eng.keys() == ["c", "d", "e"]
    np.testing.assert_array_equal(rec.got[1][1], before["b"])


def test_on_evict_raising_during_idle_sweep():
    clock, rec = Clock(), Recorder()
    eng = Engine(model(), idle_timeout=1, on_evict=rec, clock=clock)
    eng.step(["a", "b"], x(2))
    before = snapshot(eng)
    clock.t += 2
    rec.fail_on = {"a"}
    with pytest.raises(OSError):
        eng.evict_idle()
    assert rec.got == [] and eng.keys() == ["a", "b"]
    np.testing.assert_array_equal(eng.state("a"), before["a"])
    rec.fail_on = set()
    assert eng.evict_idle() == ["a", "b"]


def test_on_evict_must_not_call_mutating_verbs_but_may_read():
    seen = []
    eng = None

    def cb(key, state):
        seen.append((key, len(eng), sorted(eng.keys())))  # reads are fine
        eng.step(["zz"], x(1))

    eng = Engine(model(), max_streams=1, on_evict=cb)
    eng.step(["a"], x(1))
    with pytest.raises(RuntimeError, match="on_evict: expected a callback that does not call the "
                                           "engine's mutating verbs"):
        eng.step(["b"], x(1))
    assert seen == [("a", 0, [])] and eng.keys() == ["a"]


def test_refused_nan_batch_evicts_nothing():
    clock, rec = Clock(), Recorder()
    eng = Engine(model(), max_streams=2, idle_timeout=5, on_evict=rec, clock=clock)
    eng.step(["a", "b"], x(2))
    bad = x(1)
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="expected finite values.*'c'"):
        eng.step(["c"], bad)
    clock.t += 10
    with pytest.raises(ValueError, match="xs: expected finite values"):
        eng.run("c", np.vstack([x(2), bad]))
    assert rec.got == [] and eng.keys() == ["a", "b"]


# --------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("kwargs, exc, pattern", [
    ({"max_streams": 0}, ValueError, "max_streams: expected a positive int or None, got 0"),
    ({"max_streams": 2.5}, ValueError, "max_streams: expected a positive int"),
    ({"max_streams": True}, ValueError, "max_streams: expected a positive int"),
    ({"idle_timeout": 0}, ValueError, "idle_timeout: expected a positive finite number"),
    ({"idle_timeout": float("inf")}, ValueError, "idle_timeout: expected a positive finite"),
    ({"idle_timeout": "10"}, TypeError, "idle_timeout: expected seconds"),
    ({"max_streams": 2, "on_evict": 3}, TypeError, "on_evict: expected a callable"),
    ({"on_evict": print}, ValueError, "on_evict: expected max_streams or idle_timeout"),
    ({"idle_timeout": 1, "clock": 5}, TypeError, "clock: expected a callable"),
])
def test_constructor_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        Engine(model(), **kwargs)


def test_operations_doc_example_runs():
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert blocks, "docs/operations.md has no python example"
    for block in blocks:
        exec(compile(block, "docs/operations.md", "exec"), {})
