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
