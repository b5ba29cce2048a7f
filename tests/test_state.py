"""The state store: key normalisation, slot reuse, growth, rollback."""

import numpy as np
import pytest

from streamgru.state import StateStore, normalize_key


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
def test_int_table_mirrors_the_dict_through_random_opens_and_closes():
    rng = np.random.default_rng(0)
    st = StateStore(2, np.float32, capacity=4)
    st.slots([0])
    st.slots_array(np.array([0], np.int64))  # builds the table
    assert st.itable is not None
    universe = np.arange(-3000, 3000, 7, dtype=np.int64)  # negative keys too
    for _ in range(300):
        op = rng.integers(4)
        if op == 0:  # a batch through the table, opening new keys
            ks = rng.choice(universe, size=int(rng.integers(1, 200)))
            slots, _ = st.slots_array(ks)
            assert [st.slot_of[int(k)] for k in ks] == slots.tolist()
        elif op == 1 and len(st) > 1:  # close some
            for k in rng.choice(list(st.slot_of), size=min(len(st) - 1, 50), replace=False):
                st.close(int(k))
        elif op == 2:  # open through the dict path, then roll back
            new = [int(k) for k in rng.choice(universe, 20) if int(k) not in st.slot_of]
            _, opened = st.slots(list(dict.fromkeys(new)))
            st.rollback(opened)
        else:  # lookups only
            ks = rng.choice(universe, size=100)
            out, missing = st.itable.lookup(ks, st.slot_of)
            expect = [st.slot_of.get(int(k), -1) for k in ks]
            assert out.tolist() == expect and missing == expect.count(-1)


def test_int_table_is_dropped_when_the_store_empties():
    st = StateStore(1, np.float32, capacity=2)
    st.slots_array(np.array([5, 6], np.int64))
    st.slots_array(np.array([5, 6], np.int64))
    assert st.itable is not None
    st.close(5)
    st.close(6)
    assert st.itable is None and st.key_kind is None
    st.slots(["now-a-str-engine"])  # the key kind may change once empty
    assert st.key_kind is str
