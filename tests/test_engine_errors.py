"""Bad input: a clear TypeError/ValueError/KeyError naming the argument, and no state change."""

import numpy as np
import pytest
from helpers import Accumulator, assert_unchanged, snapshot

from streamgru import Engine, GRULayer, GRUModel, UnsupportedModelError


@pytest.fixture
def eng():
    e = Engine(GRUModel.random(4, [6], dense_after=[(2, "identity")], seed=2))
    e.step(["a", "b"], np.ones((2, 4), np.float32))
    return e


BAD_STEP = [
    # (keys, x, exception, message fragment)
    (["a", "b"], np.ones((3, 4)), ValueError, r"x: expected shape \(2, 4\) \(len\(keys\) = 2\)"),
    (["a"], np.ones((1, 5)), ValueError, r"x: expected shape \(1, 4\)"),
    (["a"], np.ones(4), ValueError, r"x: expected shape \(1, 4\).*x\[None, :\]"),
    (["a"], np.ones((1, 1, 4)), ValueError, r"x: expected shape"),
    (["a"], np.ones((1, 4), np.int64), TypeError, r"x: expected a float32 or float64 array, got "
                                                  r"dtype int64; convert it with \.astype"),
    (["a"], np.array([[object()] * 4]), TypeError, r"x: expected a float32 or float64 array, got "
                                                   r"dtype object"),
    (["a"], np.array([["1", "2", "3", "4"]]), TypeError, r"x: expected a float32"),
    (["a"], np.ones((1, 4), bool), TypeError, r"x: expected a float32"),
    (["a"], [[1.0, 2.0, 3.0]], ValueError, r"x: expected shape \(1, 4\)"),
    (["a", "new"], np.array([[1, 2, 3, 4], [1, np.nan, 3, 4]], np.float32), ValueError,
     r"x: expected finite values, got NaN/inf \(or values too large for float32\) in the rows "
     r"of key\(s\) 'new'"),
    (["a"], np.array([[np.inf, 0, 0, 0]]), ValueError, r"x: expected finite values"),
    ("ab", np.ones((2, 4)), TypeError, r"keys: expected a sequence of int or str keys, got str"),
    ("a", np.ones((1, 4)), TypeError, r"wrap a single key in a list"),
    (5, np.ones((1, 4)), TypeError, r"keys: expected a sequence"),
    ([["a"]], np.ones((1, 4)), TypeError, r"keys\[0\]: expected an int or str stream key, got list"),
    ([{"a": 1}], np.ones((1, 4)), TypeError, r"keys\[0\]: expected an int or str stream key"),
    ([1.5], np.ones((1, 4)), TypeError, r"keys\[0\]: expected an int or str stream key, got float"),
    ([True], np.ones((1, 4)), TypeError, r"keys\[0\]: expected an int or str stream key, got bool"),
    ([None], np.ones((1, 4)), TypeError, r"keys\[0\]: expected an int or str stream key"),
    (["a", 3], np.ones((2, 4)), TypeError, r"keys: expected all keys to be strs .* got int 3"),
    ([3], np.ones((1, 4)), TypeError, r"keys: expected all keys to be strs"),
    ([2**70], np.ones((1, 4)), ValueError, r"keys\[0\]: expected an int within int64"),
    (np.array([[1, 2]]), np.ones((2, 4)), ValueError, r"keys: expected a 1-D sequence"),
    (np.array([1.0, 2.0]), np.ones((2, 4)), TypeError, r"keys: expected integer or str keys, got "
                                                       r"an array of dtype float64"),
]


@pytest.mark.parametrize("keys,x,exc,msg", BAD_STEP)
def test_bad_step_input_is_refused_and_changes_nothing(eng, keys, x, exc, msg):
    snap = snapshot(eng)
    with pytest.raises(exc, match=msg):
        eng.step(keys, x)
    assert_unchanged(eng, snap)


def test_nan_input_scan_can_be_disabled_but_the_result_check_stays():
    # check_finite=False skips the input scan only: the NaN reaches the kernel, whose result
    # check refuses the step (message of the result check, not the scan's) and keeps the state.
    e = Engine(GRUModel.random(4, [6], seed=2), check_finite=False)
    e.step(["a"], np.ones((1, 4), np.float32))
    before = e.state("a")
    with pytest.raises(ValueError, match=r"would produce NaN/inf .* for key\(s\) 'a'") as info:
        e.step(["a"], np.full((1, 4), np.nan, np.float32))
    assert info.value.keys == ["a"]
    np.testing.assert_array_equal(e.state("a"), before)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda e: e.state("zzz"), KeyError, "unknown key 'zzz'"),
    (lambda e: e.reset("zzz"), KeyError, "unknown key 'zzz'"),
    (lambda e: e.close("zzz"), KeyError, "unknown key 'zzz'"),
    (lambda e: e.state(["a"]), TypeError, "key: expected an int or str stream key, got list"),
    (lambda e: e.set_state("a", np.ones(5)), ValueError,
     r"state: expected 6 values \(state_size\), got shape \(5,\)"),
    (lambda e: e.set_state("a", np.ones((2, 4))), ValueError, r"state: expected 6 values"),
    (lambda e: e.set_state("a", np.array(["x"] * 6)), TypeError, "state: expected a float array"),
    (lambda e: e.set_state("new", np.full(6, np.nan)), ValueError, "state: expected finite"),
    (lambda e: e.set_state(1, np.zeros(6)), TypeError, "key: expected all keys to be strs"),
    (lambda e: e.open("a"), KeyError, "already open"),
    (lambda e: e.open("n", np.ones(7)), ValueError, "state: expected 6 values"),
    (lambda e: e.run("a", np.ones((3, 5))), ValueError, r"xs: expected shape \('T', 4\)"),
    (lambda e: e.run("new", np.array([[0, 0, 0, np.nan]])), ValueError,
     r"xs: expected finite values, got NaN/inf \(or values too large for float32\) in "
     r"step\(s\) \[0\]"),
    (lambda e: e.run(["a"], np.ones((3, 4))), TypeError, "key: expected an int or str"),
    (lambda e: e.run("a", np.ones((3, 4), np.int32)), TypeError, "xs: expected a float32"),
])
def test_bad_verb_input_is_refused_and_changes_nothing(eng, call, exc, msg):
    snap = snapshot(eng)
    with pytest.raises(exc, match=msg):
        call(eng)
    assert_unchanged(eng, snap)


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"dtype": "float16"}, ValueError, "dtype: expected 'float32' or 'float64', got 'float16'"),
    ({"dtype": "int"}, ValueError, "dtype: expected"),
    ({"capacity": 0}, ValueError, "capacity: expected a positive int, got 0"),
    ({"capacity": 2.5}, ValueError, "capacity: expected a positive int"),
    ({"threads": 0}, ValueError, "threads: expected an int from 1"),
    ({"threads": 10_000}, ValueError, "threads: expected an int from 1"),
])
def test_bad_engine_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        Engine(GRUModel.random(2, 3), **kwargs)


def test_model_must_be_a_grumodel():
    with pytest.raises(TypeError, match="model: expected a streamgru.GRUModel, got dict"):
        Engine({})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_model_with_a_kind_the_kernels_do_not_run_is_refused_by_name(dtype):
    # A layer kind of the protocol without a kernel cell (runnable False) is refused by name,
    # never packed as another kind.
    model = GRUModel([GRULayer(2, 4, np.zeros((12, 2)), np.zeros((12, 4)), linear_before_reset=1),
                      Accumulator(4, np.ones(4))]).astype(dtype)
    with pytest.raises(UnsupportedModelError, match=r"^model: expected layers the engine runs "
                                                    r"\(dense, gru, lstm\), got layers\[1\], a "
                                                    r"'accumulator' layer, which the engine does "
                                                    r"not run"):
        Engine(model, dtype=dtype)


def test_float64_input_is_converted_for_float32_engine(eng):
    x = np.random.default_rng(0).normal(size=(2, 4))
    y64 = eng.step(["c", "d"], x)
    assert y64.dtype == np.float32
    e2 = Engine(eng.model)
    np.testing.assert_array_equal(e2.step(["c", "d"], x.astype(np.float32)), y64)


def test_empty_batch_returns_empty(eng):
    snap = snapshot(eng)
    y = eng.step([], np.zeros((0, 4), np.float32))
    assert y.shape == (0, 2)
    y = eng.run("a", np.zeros((0, 4)))
    assert y.shape == (0, 2)
    assert_unchanged(eng, snap)


def test_contains_with_odd_keys(eng):
    assert "a" in eng
    assert ["a"] not in eng
    assert 1.5 not in eng


def test_values_too_large_for_float32_are_refused_quietly(eng, recwarn):
    snap = snapshot(eng)
    with pytest.raises(ValueError, match=r"too large for float32\) in the rows of key\(s\) 'a'"):
        eng.step(["a"], np.array([[1e39, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"too large for float32\) in step\(s\) \[1\]"):
        eng.run("a", np.array([[0.0] * 4, [0.0, -1e300, 0.0, 0.0]]))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert_unchanged(eng, snap)
