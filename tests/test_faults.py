"""Fault injection: what the engine does when a step overflows, a snapshot holds a bad row, a
model does not fit float32, a key holds NUL, or an allocation (or anything else) fails mid-call.

Every test states a guarantee of docs/operations.md ("Faults"). References are the float64
oracle, or the states read before the refused call (an untouched copy), never numbers of ours.
"""

import dataclasses

import numba
import numpy as np
import oracle
import pytest
from helpers import assert_unchanged, snapshot
from numba import config

from streamgru import Engine, GRUModel
from streamgru import engine as engine_mod
from streamgru import formats as F
from streamgru import kernels as K
from streamgru.errors import NonFiniteError
from streamgru.model import DenseLayer, GRULayer, LSTMLayer
from streamgru.state import IntSlotTable, StateStore

I, H = 3, 8
# An input value whose product with OVERFLOW_W is beyond the dtype's range, while the weight
# itself fits (the tester's case: float32 weights near 1e20, inputs near 1e19).
OVERFLOW_W = 1e20
BIG = {"float32": 1e19, "float64": 1e300}
TOL = {"float32": 2e-5, "float64": 1e-12}


def overflow_model():
    """A GRU (identity candidate, so nothing saturates) + identity Dense head. Input column 0
    feeds the candidate with weight OVERFLOW_W; ordinary rows keep column 0 at zero, so their
    states stay small and the oracle comparison is meaningful."""
    base = GRUModel.random(I, H, dense_after=[(2, "identity")], seed=3, dtype=np.float64)
    gru, dense = base.layers
    W = gru.W.copy()
    W[2 * H:, 0] = OVERFLOW_W
    return GRUModel([GRULayer(I, H, W, gru.R, gru.Wb, gru.Rb, linear_before_reset=1, g="identity"),
                     DenseLayer(H, 2, dense.W, dense.b)])


def lstm_overflow_model():
    """The same for an LSTM layer (identity candidate and cell output: C and h grow without
    saturating) between a Dense layer and the head, so the state is h, then C."""
    rng = np.random.default_rng(4)
    H4 = 4 * H
    W = rng.uniform(-0.3, 0.3, (H4, I))
    W[3 * H:, 0] = OVERFLOW_W  # the candidate block (gate order i, o, f, c)
    return GRUModel([LSTMLayer(I, H, W, rng.uniform(-0.3, 0.3, (H4, H)), rng.uniform(-0.3, 0.3, H4),
                               None, g="identity", h="identity"),
                     DenseLayer(H, 2, rng.normal(size=(2, H)), rng.normal(size=2))])


MODEL = overflow_model()
MODELS = {"gru": MODEL, "lstm": lstm_overflow_model()}


def rows(n, seed):
    x = np.random.default_rng(seed).normal(size=(n, I))
    x[:, 0] = 0.0
    return x


# ----------------------------------------------------------------------------------------------
# item 3: no path writes NaN/inf into a state; the call is refused whole, naming the keys

# The NUMBA_DISABLE_JIT=1 pass (marker nojit) runs the kernel bodies of every path as Python.
PATHS = [pytest.param(p, marks=pytest.mark.nojit)
         for p in ("serial", "parallel", "wide", "one", "one_wide", "run", "run_wide")]


def make_engine(path, dtype, check_finite, monkeypatch, model=MODEL):
    threads = 1 if path in ("serial", "one", "run") else 2
    if path in ("wide", "one_wide"):  # few rows, "large" layer: split the weights over threads
        monkeypatch.setattr(engine_mod, "WIDE_MIN_MACS", 0)
    if path == "run_wide":
        monkeypatch.setattr(engine_mod, "RUN_WIDE_MIN_MACS", 0)
    return Engine(model, dtype=dtype, threads=threads, check_finite=check_finite)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("bad_value", ["overflow", "nan_unchecked"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("path", PATHS)
def test_a_step_that_would_write_nan_or_inf_is_refused_and_changes_nothing(path, dtype, bad_value,
                                                                           kind, monkeypatch):
    if config.DISABLE_JIT and dtype == "float64" and bad_value == "overflow":
        pytest.skip("as Python, the float64 sigmoid's math.exp raises OverflowError where the "
                    "compiled kernel gives inf")
    MODEL = MODELS[kind]  # noqa: N806 (the module's model, or the LSTM one)
    eng = make_engine(path, dtype, bad_value == "overflow", monkeypatch, MODEL)
    n = 70 if path == "parallel" else 5
    keys = [f"k{i}" for i in range(n - 1)] + ["k1"]  # k1 twice: stepped in two waves
    h0 = np.random.default_rng(1).normal(size=(n - 1, MODEL.state_size)) * 0.5
    for i, k in enumerate(keys[:-1]):
        eng.set_state(k, h0[i])
    before = snapshot(eng)
    bad = BIG[dtype] if bad_value == "overflow" else np.nan
    if path in ("run", "run_wide"):
        for key in ("k1", "new"):  # an open stream, and a key the refused call must not open
            xs = rows(6, 2)
            xs[3, 0] = bad
            with pytest.raises(NonFiniteError, match=r"would produce NaN/inf") as info:
                eng.run(key, xs)
            assert info.value.keys == [key]
            assert_unchanged(eng, before)
        ys, h = oracle.run(MODEL, xs[:3], h0[1])
        np.testing.assert_allclose(eng.run("k1", xs[:3]), ys, rtol=TOL[dtype], atol=TOL[dtype])
        np.testing.assert_allclose(eng.state("k1"), h, rtol=TOL[dtype], atol=TOL[dtype])
        return
    if path in ("one", "one_wide"):  # the one-event fast path: an open key, a ready array
        x = rows(1, 2).astype(dtype)
        x[0, 0] = bad
        with pytest.raises(NonFiniteError, match=r"for key\(s\) 'k1'") as info:
            eng.step(["k1"], x)
        assert info.value.keys == ["k1"]
        assert_unchanged(eng, before)
        return
    x = rows(n + 1, 2)
    keys = keys + ["fresh"]
    x[-2, 0] = bad  # the second occurrence of k1: its first wave ran, then must be undone
    with pytest.raises(NonFiniteError, match=r"would produce NaN/inf .*'k1'") as info:
        eng.step(keys, x)
    assert info.value.keys == ["k1"]
    assert "fresh" not in eng
    assert_unchanged(eng, before)
    # The caller drops the named rows and calls again: every other stream advances as the
    # oracle says, from the states it had before the refused call.
    good = [i for i, k in enumerate(keys) if k not in info.value.keys]
    y = eng.step([keys[i] for i in good], x[good])
    start = np.array([before.get(k, np.zeros(MODEL.state_size)) for k in keys], np.float64)
    y_ref, h_ref = oracle.step(MODEL, start[good], x[good])
    np.testing.assert_allclose(y, y_ref, rtol=TOL[dtype], atol=TOL[dtype])
    for j, i in enumerate(good):
        np.testing.assert_allclose(eng.state(keys[i]), h_ref[j], rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_array_equal(eng.state("k1"), before["k1"])


def test_the_finite_check_fires_in_compiled_code():
    # FASTMATH has no nnan/ninf, so the comparison scan is not assumed away: prove it on the
    # compiled helper (this module runs under the JIT in the main pass).
    a = np.array([[0.0, 1.0, 2.0], [1e308, 1e308, 0.0], [0.0, np.inf, 0.0], [np.nan, 0, -np.inf]])
    nonfinite = numba.njit(cache=False)(lambda a, i, lo, hi: K._nonfinite(a, i, lo, hi))
    assert [nonfinite(a, i, 0, 3) for i in range(4)] == [0, 0, 1, 2]
    assert [nonfinite(a, 3, lo, 3) for lo in range(4)] == [2, 1, 1, 0]  # from lo, and empty
    b = np.array([[3e38, np.inf, 1.0, -np.inf]], np.float32)  # float32 as well
    assert nonfinite(b, 0, 0, 4) == 2 and nonfinite(b, 0, 0, 1) == 0
    assert K._first_nonfinite_row(a[:2]) == -1 and K._first_nonfinite_row(a) == 2
    assert K._first_nonfinite_row(a[[0, 3]].astype(np.float32)) == 1


def write_snapshot(path, keys, states, model):
    """A snapshot as an older version (or a hand edit) could leave it: save_state refuses to
    write NaN/inf now, so the file is encoded directly."""
    meta = {"format": F.STATE_FORMAT, "format_version": F.FORMAT_VERSION,
            "model_fingerprint": model.fingerprint, "key_kind": "int", "count": len(keys),
            "state_size": model.state_size, "dtype": states.dtype.name}
    path.write_bytes(F._encode({"states": states, "keys": np.array(keys, np.int64)}, meta))


def test_one_bad_row_in_a_snapshot_does_not_cost_the_others(tmp_path):
    states = np.random.default_rng(0).normal(size=(1000, MODEL.state_size)).astype(np.float32)
    states[17, 2] = np.nan
    path = tmp_path / "s.sgru"
    write_snapshot(path, list(range(1000)), states, MODEL)
    eng = Engine(MODEL)
    eng.set_state(5, np.ones(MODEL.state_size))
    before = snapshot(eng)
    with pytest.raises(NonFiniteError, match=r"path: expected finite states .* key\(s\) 17;") as info:
        eng.load_state(path)
    assert info.value.keys == [17]
    assert_unchanged(eng, before)
    assert eng.load_state(path, skip_nonfinite=True).skipped == [17]
    assert len(eng) == 999 and 17 not in eng
    np.testing.assert_array_equal(eng.state(999), states[999])


def test_save_state_refuses_a_non_finite_state_naming_its_key(tmp_path):
    with pytest.raises(NonFiniteError, match=r"key\(s\) 'b'; nothing was written") as info:
        F.save_state(tmp_path / "s.sgru", ["a", "b"], np.array([[0.0], [np.inf]]), "f" * 64)
    assert info.value.keys == ["b"] and not (tmp_path / "s.sgru").exists()


def test_float64_snapshot_with_values_beyond_float32_is_refused_by_a_float32_engine(tmp_path):
    wide = Engine(MODEL, dtype="float64")
    wide.set_state(1, np.full(MODEL.state_size, 0.25))
    wide.set_state(2, np.full(MODEL.state_size, 1e39))
    wide.save_state(tmp_path / "s.sgru")
    eng = Engine(MODEL)
    with pytest.raises(NonFiniteError, match=r"too large for float32\) in the states of key\(s\) 2"):
        eng.load_state(tmp_path / "s.sgru")
    assert len(eng) == 0
    assert eng.load_state(tmp_path / "s.sgru", skip_nonfinite=True).skipped == [2]
    np.testing.assert_array_equal(eng.state(1), np.full(MODEL.state_size, 0.25, np.float32))


# ----------------------------------------------------------------------------------------------
# item 4: weights beyond float32's range


def test_weights_beyond_float32_are_refused_for_a_float32_engine():
    base = GRUModel.random(I, [4, 4], seed=0, dtype=np.float64)
    R = base.layers[1].R.copy()
    R[0, 0] = 1e39
    g = base.layers[1]
    model = GRUModel([base.layers[0], GRULayer(4, 4, g.W, R, g.Wb, g.Rb, linear_before_reset=1)])
    with pytest.raises(ValueError, match=r"model: layer 1 \(gru\) tensor R holds values beyond "
                                         r"float32's range \(max \|v\| = 1e\+39\); use "
                                         r'dtype="float64"'):
        Engine(model)
    y = Engine(model, dtype="float64").step([0], np.ones((1, I)))
    y_ref, _ = oracle.step(model, np.zeros((1, model.state_size)), np.ones((1, I)))
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# item 5b: NUL in str keys


@pytest.mark.parametrize("call", [
    lambda e: e.step(["a\x00"], np.zeros((1, I))),
    lambda e: e.step(np.array(["b", "a\x00c"]), np.zeros((2, I))),
    lambda e: e.open("a\x00"),
    lambda e: e.set_state("a\x00", np.zeros(H)),
    lambda e: e.run("a\x00", np.zeros((2, I))),
])
def test_str_keys_with_nul_are_refused_everywhere(call):
    eng = Engine(MODEL)
    eng.step(["a"], np.zeros((1, I)))
    before = snapshot(eng)
    with pytest.raises(ValueError, match=r"expected a str key without NUL characters"):
        call(eng)
    assert_unchanged(eng, before)


@pytest.mark.parametrize("keys", [["", "\ud800"], np.array(["", "x\udc00"])])
def test_a_key_that_cannot_be_saved_is_refused_before_anything_is_evicted(keys):
    # A lone surrogate cannot be written to a snapshot (UTF-8): it was refused only when the
    # stream was opened, after a bounded engine had already evicted a stream to make room.
    evicted = []
    eng = Engine(MODEL, max_streams=2, on_evict=lambda k, s: evicted.append(k))
    eng.step(["k0", "k1"], np.zeros((2, I)))
    before = snapshot(eng)
    with pytest.raises(ValueError, match=r"keys\[1\]: expected a str encodable as UTF-8"):
        eng.step(keys, np.zeros((2, I)))
    assert evicted == []
    assert_unchanged(eng, before)


def test_sharded_engine_key_validation_refuses_nul():
    from streamgru.cluster import shard_of  # placement only: no Ray needed

    for keys in (["a\x00"], np.array(["x", "a\x00b"])):
        with pytest.raises(ValueError, match=r"keys\[[01]\]: expected a str key without NUL"):
            shard_of(keys, 2)


# ----------------------------------------------------------------------------------------------
# item 7: every mutating call is all-or-nothing for any exception


def boom(exc):
    def raiser(*args, **kwargs):
        raise exc
    return raiser


def tracked(**kw):
    return Engine(MODEL, capacity=2, max_streams=1000, **kw)


ONE, TWO, INTS = ["a"], ["a", "b"], np.arange(70)  # streams open before the failing call
FAULTS = [
    # (streams open, what fails, the call). Capacity is 2 slots: ONE leaves one slot free, so
    # a batch of new keys opens one and needs the buffer to grow for the next.
    (ONE, "Engine._grow_scratch", lambda e: e.step([f"n{i}" for i in range(40)], rows(40, 0))),
    (ONE, "StateStore.grow", lambda e: e.step(["a", "n1", "n2", "a", "n3"], rows(5, 0))),
    (ONE, "kernels.step_serial", lambda e: e.step(["a", "n1"], rows(2, 0))),
    (INTS, "StateStore.grow", lambda e: e.step(np.arange(100, 200), rows(100, 0))),  # int table
    (ONE, "kernels.run_sequence", lambda e: e.run("n1", rows(3, 0))),
    (ONE, "kernels.step_one", lambda e: e.step(["a"], rows(1, 0).astype(np.float32))),
    (TWO, "StateStore.grow", lambda e: e.open("n1")),
    (TWO, "StateStore.grow", lambda e: e.set_state("n1", np.ones(H))),
]


def fail_with(monkeypatch, inject, exc, eng):
    owner, name = inject.split(".")
    target = {"Engine": Engine, "StateStore": StateStore, "kernels": K,
              "IntSlotTable": IntSlotTable}[owner]
    if owner == "kernels" and name in K.KernelSet._fields:  # the engine's cell set's kernel
        ks = eng._packed.kernels._replace(**{name: boom(exc("injected"))})
        monkeypatch.setattr(eng, "_packed", dataclasses.replace(eng._packed, kernels=ks))
    else:
        monkeypatch.setattr(target, name, boom(exc("injected")))
    if inject == "kernels.step_one":  # the one-event path's cached entry point
        monkeypatch.setattr(eng, "_run1", boom(exc("injected")))


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("opened,inject,call", FAULTS)
@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt])
def test_a_call_that_fails_anywhere_changes_nothing(opened, inject, call, exc, track,
                                                    monkeypatch):
    eng = Engine(MODEL, capacity=2, max_streams=1000 if track else None)
    eng.step(opened, rows(len(opened), 1))
    before = snapshot(eng)
    with monkeypatch.context() as m:
        fail_with(m, inject, exc, eng)
        with pytest.raises(exc, match="injected"):
            call(eng)
    assert_unchanged(eng, before)
    call(eng)  # and the engine still works afterwards
    assert len(eng) == len(eng.keys())


@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt])
def test_close_that_fails_in_the_int_table_keeps_the_stream(exc, monkeypatch):
    eng, twin = Engine(MODEL), Engine(MODEL)  # the twin never sees the failure
    for e in (eng, twin):
        e.step(np.arange(70), rows(70, 1))
        e.step(np.arange(70), rows(70, 3))  # int keys of an int engine: the compiled table
    before = snapshot(eng)
    with monkeypatch.context() as m:
        fail_with(m, "IntSlotTable.delete", exc, eng)
        with pytest.raises(exc):
            eng.close(7)
    assert_unchanged(eng, before)
    for e in (eng, twin):
        e.close(7)
        e.step(np.arange(3, 73), rows(70, 2))  # 7 reopens; the table must map every key right
    assert_unchanged(eng, snapshot(twin))


@pytest.mark.parametrize("keys", [[1, 2, 3], ["a", "b", "c"]])
def test_load_state_that_fails_midway_keeps_the_old_streams(keys, tmp_path, monkeypatch):
    eng = Engine(MODEL)
    eng.step(keys, rows(3, 0))
    eng.save_state(tmp_path / "s.sgru")
    eng.step(keys[:1], rows(1, 1))
    before = snapshot(eng)
    calls = []

    def open_then_fail(self, key, _open=StateStore.open):  # str keys open one at a time
        calls.append(key)
        if len(calls) == 2:
            raise KeyboardInterrupt("injected")
        return _open(self, key)

    def insert_then_fail(self, ks, slots, _insert=IntSlotTable.insert):  # int keys: one batch
        _insert(self, ks, slots)
        raise KeyboardInterrupt("injected")

    monkeypatch.setattr(StateStore, "open", open_then_fail)
    monkeypatch.setattr(IntSlotTable, "insert", insert_then_fail)
    with pytest.raises(KeyboardInterrupt):
        eng.load_state(tmp_path / "s.sgru")
    assert_unchanged(eng, before)


def test_eviction_whose_callback_is_interrupted_keeps_the_stream():
    def on_evict(key, state):
        raise KeyboardInterrupt("injected")

    eng = Engine(MODEL, max_streams=2, on_evict=on_evict)
    eng.step(["a", "b"], rows(2, 0))
    before = snapshot(eng)
    with pytest.raises(KeyboardInterrupt):
        eng.step(["c"], rows(1, 1))
    assert_unchanged(eng, before)


def test_eviction_whose_callback_is_interrupted_keeps_the_last_observed_values():
    def on_evict(key, state):
        raise KeyboardInterrupt("injected")

    eng = Engine(MODEL, max_streams=2, on_evict=on_evict, missing="last")
    eng.step(["a", "b"], rows(2, 0))
    memory = eng.last_observed("a")
    with pytest.raises(KeyboardInterrupt):
        eng.step(["c"], rows(1, 1))
    np.testing.assert_array_equal(eng.last_observed("a"), memory)


# Missing values (Engine(missing=...)): the policy's path changes states in several steps (skip:
# one kernel call per chunk; last: the step, then the memory), so it backs them up first.
def missing_rows(n, nan_rows, seed):
    x = rows(n, seed)
    x[nan_rows, 1] = np.nan
    return x


MISSING_CALLS = [
    # (policy, the call, what fails or overflows). keys a, a, a with a NaN in the middle: "skip"
    # steps the first row in its own chunk before the second chunk fails.
    ("skip", lambda e, x: e.step(["a", "a", "a"], x), "Engine._held_output"),
    ("skip", lambda e, x: e.run("a", x), "Engine._held_output"),
    ("last", lambda e, x: e.step(["a", "n", "a"], x), "kernels.scatter_rows"),
    ("zero", lambda e, x: e.step(["a", "n", "a"], x), "Engine._step_rows"),
]


@pytest.mark.parametrize("policy,call,inject", MISSING_CALLS)
@pytest.mark.parametrize("fault", [MemoryError, KeyboardInterrupt, "overflow"])
def test_a_missing_value_call_that_fails_anywhere_changes_nothing(policy, call, inject, fault,
                                                                  monkeypatch):
    eng = Engine(MODEL, missing=policy)
    eng.step(["a", "b"], rows(2, 1))
    eng.step(["a", "b"], missing_rows(2, [1], 2))
    before = snapshot(eng)
    memory = {k: eng.last_observed(k) for k in before} if policy == "last" else None
    x = missing_rows(3, [1], 3)
    with monkeypatch.context() as m:
        if fault == "overflow":  # the last row overflows: found after the earlier rows stepped
            x[2, 0] = BIG["float32"]
            expect = pytest.raises(NonFiniteError, match="'a'")
        else:
            owner, name = inject.split(".")
            target = {"Engine": Engine, "kernels": K}[owner]
            m.setattr(target, name, boom(fault("injected")))
            expect = pytest.raises(fault, match="injected")
        with expect:
            call(eng, x)
    assert_unchanged(eng, before)
    if memory is not None:
        for k, v in memory.items():
            np.testing.assert_array_equal(eng.last_observed(k), v)
    assert eng.stats()["missing"]["values"] == 1  # the refused call counted nothing


# ----------------------------------------------------------------------------------------------
# item 10: minor refusals


def test_masked_array_nan_names_the_key_and_masked_values_are_refused():
    eng = Engine(MODEL)
    x = np.ma.masked_array(np.zeros((2, I)), mask=False)
    x[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match=r"in the rows of key\(s\) 'b';") as info:
        eng.step(["a", "b"], x)
    assert info.value.keys == ["b"]
    with pytest.raises(ValueError, match=r"x: expected an array without masked values"):
        eng.step(["a"], np.ma.masked_array(np.zeros((1, I)), mask=[[1, 0, 0]]))
    assert len(eng) == 0


def test_float64_engine_accepts_huge_finite_inputs():
    # The row [1e308, 1e308, 0] is finite: the input scan must not overflow a sum. Columns 0 and
    # 1 get zero weights so that the step itself stays finite.
    base = GRUModel.random(I, H, seed=4, dtype=np.float64)
    g = base.layers[0]
    W = g.W.copy()
    W[:, :2] = 0.0
    model = GRUModel([GRULayer(I, H, W, g.R, g.Wb, g.Rb, linear_before_reset=1)])
    x = np.array([[1e308, 1e308, 0.0]])
    y = Engine(model, dtype="float64").step(["a"], x)
    y_ref, _ = oracle.step(model, np.zeros((1, H)), np.where(np.abs(x) > 1, 0.0, x))
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)


def test_ragged_state_is_refused_with_a_message_naming_the_argument():
    eng = Engine(MODEL)
    with pytest.raises(TypeError, match=r"state: expected a float array, got list that numpy "
                                        r"cannot read"):
        eng.set_state("a", [[0.0] * 4, [0.0] * 3])
    assert len(eng) == 0
