"""The state store: key normalisation, slot reuse, growth, rollback."""

import sys
import tracemalloc

import numpy as np
import pytest

from streamgru.state import HOT_MAX, IntSlotTable, SlotBuffer, StateStore, normalize_key


def test_normalize_key():
    assert normalize_key(np.int16(5)) == 5 and type(normalize_key(np.int16(5))) is int
    assert normalize_key("é") == "é"
    for bad in (True, 1.0, None, b"x", (1,)):
        with pytest.raises(TypeError, match="key: expected an int or str stream key"):
            normalize_key(bad)
    with pytest.raises(ValueError, match="within int64"):
        normalize_key(2**63)


def test_growth_keeps_every_state_in_place():
    st = StateStore(3, np.float32, capacity=2)
    slots, opened = st.slots(["a", "b"])
    st.states[slots] = [[1, 2, 3], [4, 5, 6]]
    slots2, _ = st.slots(["c", "d", "e"])
    assert st.capacity >= 5
    np.testing.assert_array_equal(st.states[st.slot_of["a"]], [1, 2, 3])
    np.testing.assert_array_equal(st.states[st.slot_of["b"]], [4, 5, 6])
    assert not st.states[slots2].any()
    assert len(set(st.slot_of.values())) == 5


def test_close_reuses_slot_and_zeroes_on_reopen():
    st = StateStore(2, np.float64, capacity=4)
    (s,), _ = st.slots([7])
    st.states[s] = 9
    st.close(7)
    (s2,), opened = st.slots([8])
    assert s2 == s and opened == [8] and not st.states[s2].any()


def test_rollback_closes_only_new_keys():
    st = StateStore(2, np.float64, capacity=4)
    st.slots(["old"])
    _, opened = st.slots(["old", "new1", "new2"])
    assert opened == ["new1", "new2"]
    st.rollback(opened)
    assert list(st.slot_of) == ["old"]


def test_key_kind_is_fixed_until_empty():
    st = StateStore(1, np.float32, capacity=2)
    st.slots([1])
    with pytest.raises(TypeError, match="expected all keys to be ints"):
        st.check_kind(["a"])
    st.close(1)
    st.check_kind(["a"])  # empty again: either kind


@pytest.mark.nojit
def test_int_table_matches_a_dict_through_opens_closes_growth_and_rebuilds():
    """The table (the only index of int keys) against a plain dict kept alongside: colliding
    keys (multiples of the first table size), negative and extreme keys, closes that leave
    tombstones, rebuilds and buffer growth; each open stream keeps its slot and its state."""
    rng = np.random.default_rng(0)
    st = StateStore(1, np.float64, capacity=4)
    universe = np.concatenate([np.arange(-3000, 3000, 7), np.arange(50) * 1021,
                               [-(2**63), 2**63 - 1, -1, 0]]).astype(np.int64)
    ref = {}
    for _ in range(300):
        op = rng.integers(4)
        if op == 0:  # a batch of keys, some new, duplicates included
            ks = rng.choice(universe, size=int(rng.integers(1, 200)))
            slots, opened = st.slots_array(ks)
            assert opened == list(dict.fromkeys(k for k in ks.tolist() if k not in ref))
            for k, s in zip(ks.tolist(), slots.tolist()):
                assert ref.setdefault(k, s) == s
            st.states[slots, 0] = ks  # each stream's state is its key (float64: exact here)
        elif op == 1 and ref:  # close some: their slots are reused, last closed first
            for k in rng.choice(list(ref), size=min(len(ref), 60), replace=False).tolist():
                assert st.close(k) == ref.pop(k)
        elif op == 2:  # open one at a time, then roll back
            new = [k for k in dict.fromkeys(rng.choice(universe, 20).tolist()) if k not in ref]
            _, opened = st.slots(new)
            assert opened == new
            st.rollback(opened)
        ks = rng.choice(universe, size=100)
        out, missing = st.slot_of.lookup(ks) if ref else (np.full(100, -1), 100)
        expect = [ref.get(k, -1) for k in ks.tolist()]
        assert out.tolist() == expect and missing == expect.count(-1)
        assert [st.slot_of.get(k, -1) for k in ks.tolist()] == expect  # the Python probe
        assert len(st) == len(ref) and dict(st.slot_of.items()) == ref
        assert len(set(ref.values())) == len(ref)
        assert st.states[list(ref.values()), 0].tolist() == [float(k) for k in ref]
        if ref:
            assert 2 * st.slot_of.used <= st.slot_of.size  # at most half full, tombstones too
    assert st.capacity > 4 and st.n_free + len(ref) == st.top


def test_an_int_table_answers_none_for_a_str_key():
    st = StateStore(1, np.float32, capacity=2)
    st.slots([5])
    assert st.slot_of.get("abc") is None and "abc" not in st.slot_of and 5 in st.slot_of
    with pytest.raises(KeyError):
        st.slot_of[6]


def test_int_table_is_dropped_when_the_store_empties():
    st = StateStore(1, np.float32, capacity=2)
    st.slots_array(np.array([5, 6], np.int64))
    assert isinstance(st.slot_of, IntSlotTable)
    st.close(5)
    st.close(6)
    assert st.slot_of == {} and st.key_kind is None
    st.slots(["now-a-str-engine"])  # the key kind may change once empty
    assert st.key_kind is str


def test_int_stream_bookkeeping_holds_no_python_object_per_key():
    """Per int-key stream the Python heap holds only table cells (the states and marks live in
    memory maps): at most 48 bytes at a third to a half full, not a dict entry, a key object
    and a slot object (~100 bytes)."""
    st = StateStore(64, np.float32, capacity=16)
    st.slots_array(np.arange(100, dtype=np.int64))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, 6000, 500):
            st.slots_array(np.arange(start, start + 500, dtype=np.int64) * 3 + 1000)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / 6000 <= 48, held / 6000
    assert st.footprint()["key_table"] / len(st) <= 50


def test_growth_moves_the_buffer_and_copies_when_a_view_pins_it():
    st = StateStore(2, np.float32, capacity=2)
    st.slots(["a", "b"])
    st.states[:2] = [[1, 2], [3, 4]]
    buf = st._buffers["states"]
    mapping = buf._map
    st.slots(["c"])  # grows: nothing else holds the buffer, so the mapping moves (mremap)
    if sys.platform.startswith("linux"):
        assert buf._map is mapping
    pinned = st.states  # a view kept alive: the mapping cannot move, so it is copied
    pinned[2] = 9
    st.slots([f"k{i}" for i in range(40)])
    assert st.capacity >= 43 and buf._map is not mapping or not sys.platform.startswith("linux")
    np.testing.assert_array_equal(st.states[:3], [[1, 2], [3, 4], [9, 9]])
    np.testing.assert_array_equal(pinned[:3], [[1, 2], [3, 4], [9, 9]])  # still valid memory
    assert not st.states[3:43].any()


@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt])
def test_growth_that_fails_on_a_later_buffer_puts_the_earlier_back(exc, monkeypatch):
    st = StateStore(3, np.float32, capacity=2)
    st.slots_array(np.array([7, 8], np.int64))
    st.states[:2] = [[1, 2, 3], [4, 5, 6]]
    calls = []
    real = SlotBuffer.resize

    def fail_second(self, capacity, used):
        calls.append(capacity)
        if len(calls) == 2:
            raise exc("injected")
        return real(self, capacity, used)

    monkeypatch.setattr(SlotBuffer, "resize", fail_second)
    with pytest.raises(exc, match="injected"):
        st.slots_array(np.array([7, 9, 10], np.int64))
    monkeypatch.undo()
    assert st.capacity == 2 and len(st) == 2 and 9 not in st.slot_of
    assert all(b.capacity == 2 for b in st._buffers.values())
    np.testing.assert_array_equal(st.states, [[1, 2, 3], [4, 5, 6]])
    slots, opened = st.slots_array(np.array([7, 9, 10], np.int64))
    assert opened == [9, 10] and st.capacity >= 4 and st.states[slots[1:]].sum() == 0
    np.testing.assert_array_equal(st.states[:2], [[1, 2, 3], [4, 5, 6]])


def test_opening_int_keys_that_is_interrupted_midway_changes_nothing(monkeypatch):
    st = StateStore(1, np.float32, capacity=8)
    st.slots_array(np.array([1, 2], np.int64))
    st.close(1)  # one slot on the free stack
    real = IntSlotTable.insert

    def insert_then_interrupt(self, keys, slots):
        real(self, keys, slots)
        raise KeyboardInterrupt

    monkeypatch.setattr(IntSlotTable, "insert", insert_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        st.slots_array(np.array([2, 3, 4], np.int64))
    monkeypatch.undo()
    assert (len(st), st.n_free, st.top) == (1, 1, 2) and list(st.slot_of) == [2]
    assert 3 not in st.slot_of and 4 not in st.slot_of
    slots, opened = st.slots_array(np.array([3, 4], np.int64))
    assert opened == [3, 4] and sorted(slots.tolist()) == [0, 2]


def test_hot_keys_never_outlive_their_stream_and_stay_bounded():
    st = StateStore(1, np.float64, capacity=4)
    st.slots_array(np.array([10, 11], np.int64))
    assert st.slot_of.get(10) == 0 and st.hot == {10: 0}
    st.close(10)
    assert st.hot.get(10) is None and st.slot_of.get(10) is None
    st.slots_array(np.array([12], np.int64))  # slot 0 again, for another key
    assert st.slot_of.get(12) == 0 and st.slot_of.get(10) is None and st.hot == {12: 0}
    ks = np.arange(100, 100 + HOT_MAX + 10, dtype=np.int64)
    st.slots_array(ks)
    for k in ks.tolist():
        assert st.slot_of.get(k) is not None and len(st.hot) <= HOT_MAX
    st.close(11)
    st.close(12)
    for k in ks.tolist():
        st.close(k)
    assert st.hot == {} and st.slot_of == {} and st.hot is st.slot_of


def test_int_table_matches_a_dict_whichever_way_keys_go_in_and_out():
    """The int-key table against a dict (the oracle), through inserts and deletes of keys that
    collide (multiples of the table size, negative keys, int64 extremes), with tombstones
    reused, one key at a time (Python probes) and in batches (the table kernels), and across
    a rebuild; every lookup, of one key or many, agrees with the dict."""
    rng = np.random.default_rng(5)
    t, ref = IntSlotTable(), {}
    size, first_table = t.size, t.tab
    pool = ([i * size for i in range(-40, 40)] + list(range(-50, 50))
            + [np.iinfo(np.int64).max - i for i in range(5)] + [np.iinfo(np.int64).min + i
                                                               for i in range(5)])
    pool = list(dict.fromkeys(pool))
    slot = 0
    for round_ in range(150):
        free = [k for k in pool if k not in ref]
        n = int(rng.choice([1, 2, 3, 5, 70])) if free else 0  # below and above PY_PROBE_MAX
        new = [int(k) for k in rng.choice(free, size=min(n, len(free)), replace=False)]
        if new:
            keys = np.array(new, np.int64)
            t.make_room(len(new))
            t.insert(keys, np.arange(slot, slot + len(new), dtype=np.int64))
            ref.update(zip(new, range(slot, slot + len(new))))
            slot += len(new)
        for k in [int(k) for k in rng.choice(list(ref), size=min(len(ref), 4), replace=False)]:
            t.delete(k)
            del ref[k]
        t.delete(12345678)  # absent: no change
        probe = np.array(pool, np.int64)
        want = np.array([ref.get(int(k), -1) for k in probe])
        for chunk in (probe[:2], probe[:3], probe):  # Python probes and the kernel
            got, missing = t.lookup(chunk)
            np.testing.assert_array_equal(got, want[:len(chunk)], err_msg=f"round {round_}")
            assert missing == np.count_nonzero(want[:len(chunk)] < 0)
        assert len(t) == len(ref) and all(t.get(k) == v for k, v in ref.items())
    assert t.tab is not first_table  # the tombstones made it rebuild at least once
