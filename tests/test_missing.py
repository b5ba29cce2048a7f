"""Missing input values: Engine(missing="skip" | "zero" | "last").

References are oracle.MissingStreams (float64, one row at a time, written from the policies'
definitions) and states read before a refused call; never numbers of the engine's own.
"""

import numpy as np
import oracle
import pytest

from streamgru import Engine, GRUModel, formats
from streamgru import engine as engine_mod
from streamgru.errors import FormatError, NonFiniteError

I = 3
MODEL = GRUModel.random(I, [6, 5], dense_before=[(4, "tanh")], dense_after=[(2, "softmax")],
                        seed=7)
TOL = {"float32": 2e-5, "float64": 1e-9}
POLICIES = ["skip", "zero", "last"]
NAN = np.nan
# Every kernel path; the NUMBA_DISABLE_JIT=1 pass (marker nojit) runs their bodies as Python.
PATHS = [pytest.param(p, marks=pytest.mark.nojit)
         for p in ("one", "one_wide", "serial", "parallel", "wide", "run", "run_wide")]


def make_engine(path, dtype, policy, monkeypatch, model=MODEL, **kw):
    """An engine whose calls take ``path`` (forced the way tests/test_faults.py does)."""
    threads = 1 if path in ("one", "serial", "run") else 2
    if path in ("wide", "one_wide"):
        monkeypatch.setattr(engine_mod, "WIDE_MIN_MACS", 0)
    if path == "parallel":
        monkeypatch.setattr(engine_mod, "PARALLEL_MIN_ROWS", 1)
    if path == "run_wide":
        monkeypatch.setattr(engine_mod, "RUN_WIDE_MIN_MACS", 0)
    return Engine(model, dtype=dtype, threads=threads, missing=policy, capacity=2, **kw)


def holes(x, cells):
    """``x`` (a copy) with NaN at each (row, column) of ``cells``; column None: the whole row."""
    x = np.array(x, dtype=np.float64)
    for r, c in cells:
        if c is None:
            x[r] = NAN
        else:
            x[r, c] = NAN
    return x


def assert_matches(eng, ref, keys, dtype):
    for k in keys:
        np.testing.assert_allclose(eng.state(k), ref.state(k), rtol=TOL[dtype], atol=TOL[dtype])
        if eng.missing == "last":
            np.testing.assert_allclose(eng.last_observed(k), ref.memory(k), rtol=TOL[dtype],
                                       atol=TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("path", PATHS)
def test_every_policy_matches_the_oracle_on_every_path(path, policy, dtype, monkeypatch):
    eng = make_engine(path, dtype, policy, monkeypatch)
    ref = oracle.MissingStreams(MODEL, policy)
    rng = np.random.default_rng(1)

    def check(keys, x, y):
        np.testing.assert_allclose(y, ref.feed_rows(keys, x), rtol=TOL[dtype], atol=TOL[dtype])
        assert np.isfinite(y).all()

    if path in ("run", "run_wide"):
        # Along time: NaN at the start (never observed / zero state), in the middle, whole rows,
        # runs of them, and a second call that starts from where the first left off.
        for key, T, cells in (("a", 7, [(0, 1), (2, None), (3, None), (5, 0)]),
                              ("b", 4, [(1, 2)]),
                              ("a", 5, [(0, None), (2, 0), (2, 2), (4, None)])):
            xs = holes(rng.normal(size=(T, I)), cells)
            check([key] * T, xs, eng.run(key, xs))
        assert_matches(eng, ref, ["a", "b"], dtype)
    elif path in ("one", "one_wide"):
        # One event of an open stream with a ready array: the fast path, which hands a NaN row
        # to the general path. "fresh" is open but has never stepped.
        for k in ("a", "b", "fresh"):
            eng.open(k)
        script = [("fresh", [(0, None)]), ("a", []), ("a", [(0, 0)]), ("b", [(0, 1), (0, 2)]),
                  ("a", [(0, None)]), ("a", [(0, 2)]), ("b", []), ("a", [])]
        for k, cells in script:
            x = holes(rng.normal(size=(1, I)), cells).astype(dtype)
            check([k], x, eng.step([k], x))
        assert_matches(eng, ref, ["a", "b", "fresh"], dtype)
    else:
        # Repeated keys in one call, in order: "a"'s NaN rows come after clean rows of "a" in
        # the same call (its held state has moved), "c" is new and starts with a NaN row.
        batches = [
            (["a", "a", "b", "a", "c", "a", "a"], [(1, 0), (2, None), (4, None), (5, 1),
                                                   (5, 2), (6, None)]),
            (["b", "a", "b", "b", "c"], [(0, 2), (2, None), (3, 0)]),
            (["a", "c", "a"], []),  # clean: "last" still records what it observed
            (["c", "a", "a"], [(0, None), (1, 0), (1, 1), (1, 2)]),
        ]
        for keys, cells in batches:
            x = holes(rng.normal(size=(len(keys), I)), cells)
            check(keys, x, eng.step(keys, x))
        assert_matches(eng, ref, ["a", "b", "c"], dtype)
    st = eng.stats()
    assert st["missing"]["policy"] == policy and st["missing"]["values"] > 0
    assert st["rows_refused"] == {"step": 0, "run": 0}


@pytest.mark.parametrize("policy", POLICIES)
def test_skip_without_dense_after_outputs_the_held_h(policy):
    # The last layer is a GRU: a skipped row's output is the held h itself.
    model = GRUModel.random(I, 4, seed=2, dtype=np.float64)
    eng = Engine(model, dtype="float64", missing=policy)
    ref = oracle.MissingStreams(model, policy)
    x = holes(np.random.default_rng(3).normal(size=(4, I)), [(1, None), (3, 0)])
    keys = ["a", "a", "b", "a"]
    np.testing.assert_allclose(eng.step(keys, x), ref.feed_rows(keys, x), atol=1e-12)
    if policy == "skip":
        np.testing.assert_array_equal(eng.step(["a"], x[1:2])[0], eng.state("a"))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("call", ["fast", "batch", "run"])
def test_inf_is_refused_under_every_policy_naming_only_its_keys(policy, call):
    eng = Engine(MODEL, missing=policy, capacity=2)
    eng.step(["a", "b"], np.ones((2, I)))
    before = {k: eng.state(k) for k in ("a", "b")}
    memory = {k: eng.last_observed(k) for k in ("a", "b")} if policy == "last" else None
    if call == "fast":
        x = np.array([[np.inf, 0.0, 1.0]], np.float32)
        with pytest.raises(NonFiniteError, match="'a'") as info:
            eng.step(["a"], x)
        assert info.value.keys == ["a"]
    elif call == "batch":
        x = holes(np.ones((3, I)), [(0, 1)])
        x[1, 2] = -np.inf
        with pytest.raises(NonFiniteError, match="'b'") as info:
            eng.step(["a", "b", "new"], x)
        assert info.value.keys == ["b"]  # "a"'s NaN is a missing value, not a fault
    else:
        xs = holes(np.ones((4, I)), [(0, None)])
        xs[2, 0] = np.inf
        with pytest.raises(NonFiniteError, match=r"step\(s\) \[2\]") as info:
            eng.run("new", xs)
        assert info.value.keys == ["new"]
    assert sorted(eng.keys()) == ["a", "b"]
    for k in ("a", "b"):
        np.testing.assert_array_equal(eng.state(k), before[k])
        if memory is not None:
            np.testing.assert_array_equal(eng.last_observed(k), memory[k])
    assert eng.stats()["missing"]["values"] == 0


def test_refuse_is_the_default_and_names_the_nan_keys():
    eng = Engine(MODEL)
    assert eng.missing == "refuse"
    with pytest.raises(NonFiniteError, match="'b'"):
        eng.step(["a", "b"], holes(np.ones((2, I)), [(1, 0)]))
    assert len(eng) == 0
    assert eng.stats()["missing"] == {"policy": "refuse", "values": 0, "rows": 0}


def test_stats_count_missing_values_and_rows():
    eng = Engine(MODEL, missing="zero")
    eng.step(["a", "b", "a"], holes(np.ones((3, I)), [(0, 0), (0, 2), (2, None)]))
    eng.run("c", holes(np.ones((4, I)), [(1, 1)]))
    eng.step(["a"], np.ones((1, I), np.float32))  # clean: nothing counted
    assert eng.stats()["missing"] == {"policy": "zero", "values": 6, "rows": 3}


def test_bad_arguments_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"missing: expected one of 'refuse', 'skip', 'zero', "
                                         r"'last', got 'ffill'"):
        Engine(MODEL, missing="ffill")
    with pytest.raises(ValueError, match="missing: expected one of"):
        Engine(MODEL, missing=None)
    with pytest.raises(ValueError, match="missing: .*check_finite=False"):
        Engine(MODEL, missing="skip", check_finite=False)
    eng = Engine(MODEL, missing="last")
    with pytest.raises(KeyError, match="unknown key 'nope'"):
        eng.last_observed("nope")
    with pytest.raises(ValueError, match="missing: expected an engine made with missing='last'.*"
                                         "got missing='zero'"):
        Engine(MODEL, missing="zero").last_observed("a")


def test_set_last_observed_overwrites_the_memory_only_and_refuses_bad_values():
    eng = Engine(MODEL, missing="last")
    eng.step(["a"], np.array([[1.0, 2.0, 3.0]], np.float32))
    state = eng.state("a")
    eng.set_last_observed("a", [4.0, 5.0, 6.0])
    assert eng.last_observed("a").tolist() == [4.0, 5.0, 6.0]
    np.testing.assert_array_equal(eng.state("a"), state)  # the state is not touched
    # The next NaN reads the values set, exactly as the float64 oracle's rule says.
    ref = oracle.MissingStreams(MODEL, "last")
    ref.feed("a", [1.0, 2.0, 3.0])
    ref.last["a"] = np.array([4.0, 5.0, 6.0])
    y = eng.step(["a"], np.array([[NAN, 0.5, NAN]], np.float32))
    np.testing.assert_allclose(y[0], ref.feed("a", [NAN, 0.5, NAN]), atol=2e-5)
    assert eng.last_observed("a").tolist() == [4.0, 0.5, 6.0]
    before = eng.last_observed("a")
    for values, err, match in [
            ([1.0, 2.0], ValueError, r"values: expected 3 values \(input_size\), got shape \(2,\)"),
            ([1.0, NAN, 2.0], ValueError, r"values: expected finite values .* at \[1\]"),
            ([1.0, 1e39, 2.0], ValueError, r"values: expected finite values within float32"),
            (["x", "y", "z"], TypeError, r"values: expected real numbers, got dtype <U1"),
    ]:
        with pytest.raises(err, match=match):
            eng.set_last_observed("a", values)
        np.testing.assert_array_equal(eng.last_observed("a"), before)
    with pytest.raises(KeyError, match="unknown key 'nope'"):
        eng.set_last_observed("nope", [0.0, 0.0, 0.0])
    assert "nope" not in eng
    with pytest.raises(ValueError, match="missing: expected an engine made with missing='last'"):
        Engine(MODEL, missing="skip").set_last_observed("a", [0.0, 0.0, 0.0])


def test_last_observed_values_belong_to_the_stream(tmp_path):
    # reset and close clear them, growth keeps them, set_state leaves them, a snapshot carries
    # them, eviction drops them.
    eng = Engine(MODEL, missing="last", capacity=2, max_streams=40)
    x = np.arange(1.0, 1.0 + 3 * I).reshape(3, I)
    eng.step(["a", "b", "c"], holes(x, [(2, 1)]))
    np.testing.assert_array_equal(eng.last_observed("c"), [x[2, 0], 0.0, x[2, 2]])
    eng.step([f"g{i}" for i in range(30)], np.ones((30, I)))  # the buffers grow
    np.testing.assert_array_equal(eng.last_observed("a"), x[0])
    eng.set_state("a", np.zeros(MODEL.state_size))
    np.testing.assert_array_equal(eng.last_observed("a"), x[0])
    eng.save_state(tmp_path / "s")
    eng.reset("a")
    np.testing.assert_array_equal(eng.last_observed("a"), np.zeros(I))
    eng.close("b")
    eng.open("b")
    np.testing.assert_array_equal(eng.last_observed("b"), np.zeros(I))
    eng.load_state(tmp_path / "s")
    np.testing.assert_array_equal(eng.last_observed("a"), x[0])
    np.testing.assert_array_equal(eng.last_observed("b"), x[1])
    # Loaded, the values fill a NaN as before the snapshot.
    ref = oracle.MissingStreams(MODEL, "last")
    ref.states["b"], ref.last["b"] = eng.state("b").astype(np.float64), x[1]
    row = holes(np.zeros((1, I)), [(0, None)])
    np.testing.assert_allclose(eng.step(["b"], row), ref.feed_rows(["b"], row), atol=2e-5)
    # Eviction (max_streams=40: 33 open) drops them: the stream comes back never observed.
    # A NaN row in the call that evicts is a missing value there too (checked before evicting).
    eng.step([f"h{i}" for i in range(39)], holes(np.ones((39, I)), [(0, None)]))
    assert "c" not in eng
    eng.open("c")
    np.testing.assert_array_equal(eng.last_observed("c"), np.zeros(I))


def test_snapshots_across_policies(tmp_path):
    last = Engine(MODEL, missing="last")
    last.step(["a"], np.full((1, I), 2.0))
    last.save_state(tmp_path / "with")
    plain = Engine(MODEL)  # refuse: saves no memory
    plain.step(["a"], np.full((1, I), 2.0))
    plain.save_state(tmp_path / "without")
    # An engine of another policy ignores the memory; the states load the same.
    other = Engine(MODEL, missing="skip")
    other.load_state(tmp_path / "with")
    np.testing.assert_array_equal(other.state("a"), last.state("a"))
    # A snapshot without memory loads as never observed.
    fresh = Engine(MODEL, missing="last")
    fresh.load_state(tmp_path / "without")
    np.testing.assert_array_equal(fresh.state("a"), plain.state("a"))
    np.testing.assert_array_equal(fresh.last_observed("a"), np.zeros(I))


def test_snapshot_memory_is_read_with_the_same_care_as_states(tmp_path):
    eng = Engine(MODEL, missing="last")
    fp, S = MODEL.fingerprint, MODEL.state_size
    states = np.zeros((2, S))
    path = tmp_path / "s"
    formats.save_state(path, ["a", "b"], states, fp, last=np.ones((3, I)))  # a row too many
    with pytest.raises(FormatError, match="last_observed of shape"):
        eng.load_state(path)
    formats.save_state(path, ["a", "b"], states, fp, last=np.ones((2, I + 1)))
    with pytest.raises(FormatError, match=r"expected last observed values of 3 features"):
        eng.load_state(path)
    last = np.ones((2, I))
    last[1, 0] = np.nan
    formats.save_state(path, ["a", "b"], states, fp, last=last)
    with pytest.raises(NonFiniteError, match="'b'"):
        eng.load_state(path)
    assert len(eng) == 0
    assert eng.load_state(path, skip_nonfinite=True).skipped == ["b"]
    assert eng.keys() == ["a"] and eng.last_observed("a").tolist() == [1.0] * I
    Engine(MODEL, missing="zero").load_state(path)  # ignored by another policy, bad row or not


@pytest.mark.parametrize("policy", POLICIES)
def test_a_large_int_key_array_takes_the_policy_too(policy):
    # 64 rows and more of an int array map keys through the compiled slot table.
    eng = Engine(MODEL, missing=policy, dtype="float64")
    ref = oracle.MissingStreams(MODEL, policy)
    rng = np.random.default_rng(4)
    for _ in range(2):  # the second call: keys open, memory and states from the first
        keys = np.concatenate([np.arange(60), [3, 3, 5, 70, 71]])
        x = holes(rng.normal(size=(65, I)), [(3, 0), (60, None), (61, 1), (63, None), (64, 2)])
        ys = ref.feed_rows(keys.tolist(), x)
        np.testing.assert_allclose(eng.step(keys, x), ys, atol=1e-9)
    assert_matches(eng, ref, [3, 5, 70, 71], "float64")
