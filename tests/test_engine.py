"""Contract suite: what every engine configuration (dtype x regime) must guarantee.

References are the float64 oracle (tests/oracle.py), never the engine itself.
"""

import threading

import numpy as np
import oracle
import pytest
from helpers import OracleStreams

import streamgru
from streamgru import Engine, GRUModel
from streamgru import engine as engine_mod

TOL = {"float32": 1e-5, "float64": 1e-9}


def small_model(seed=0, lbr=1, kind="gru"):
    """Dense -> two recurrent layers -> Dense; ``kind`` "gru" (both GRU) or "lstm" (an LSTM,
    then a GRU: a state of h, C, h)."""
    cell = ["lstm", "gru"] if kind == "lstm" else "gru"
    return GRUModel.random(5, [8, 6], dense_before=[(7, "tanh")], dense_after=[(3, "softmax")],
                           linear_before_reset=lbr, cell=cell, seed=seed)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture(params=["gru", "lstm"])
def kind(request):
    """The contract holds for every recurrent layer kind."""
    return request.param


@pytest.fixture(params=["serial", "parallel"])
def regime(request, monkeypatch):
    # The parallel kernel is chosen from PARALLEL_MIN_ROWS rows; lowering it makes every batch
    # of the contract suite go through it.
    if request.param == "parallel":
        monkeypatch.setattr(engine_mod, "PARALLEL_MIN_ROWS", 1)
    return request.param


@pytest.mark.nojit
def test_interleaved_streams_match_oracle(dtype, regime, kind):
    model = small_model(kind=kind)
    eng = Engine(model, dtype=dtype, capacity=2)
    rng = np.random.default_rng(1)
    keys_pool = [f"s{i}" for i in range(7)]
    ref = OracleStreams(model)
    for _ in range(12):
        n = int(rng.integers(1, 9))
        keys = list(rng.choice(keys_pool, size=n))  # duplicates happen
        x = rng.normal(size=(n, 5))
        y = eng.step(keys, x.astype(dtype))
        y_ref = ref.step(keys, x.astype(dtype).astype(np.float64))
        np.testing.assert_allclose(y, y_ref, atol=TOL[dtype], rtol=0)
    for k, s in ref.states.items():
        np.testing.assert_allclose(eng.state(k), s, atol=TOL[dtype], rtol=0)


def test_duplicate_keys_equal_separate_calls(dtype, regime, kind):
    model = small_model(seed=3, kind=kind)
    a = Engine(model, dtype=dtype)
    b = Engine(model, dtype=dtype)
    rng = np.random.default_rng(2)
    keys = [1, 2, 1, 1, 3, 2, 1]
    x = rng.normal(size=(len(keys), 5)).astype(dtype)
    y = a.step(keys, x)
    y_sep = np.concatenate([b.step([k], x[i:i + 1]) for i, k in enumerate(keys)])
    # Same arithmetic in the same order: identical, not merely close.
    np.testing.assert_array_equal(y, y_sep)
    for k in (1, 2, 3):
        np.testing.assert_array_equal(a.state(k), b.state(k))


def test_stream_isolation(dtype, regime, kind):
    eng = Engine(small_model(kind=kind), dtype=dtype)
    rng = np.random.default_rng(3)
    eng.step(["a", "b"], rng.normal(size=(2, 5)))
    before = eng.state("b")
    for _ in range(5):
        eng.step(["a"], rng.normal(size=(1, 5)))
    np.testing.assert_array_equal(eng.state("b"), before)
    assert not np.array_equal(eng.state("a"), before)


def test_run_equals_repeated_step(dtype, kind):
    model = small_model(seed=5, lbr=0, kind=kind)
    a = Engine(model, dtype=dtype)
    b = Engine(model, dtype=dtype)
    rng = np.random.default_rng(4)
    s0 = rng.normal(size=model.state_size) * 0.3
    a.open("k", s0)
    b.open("k", s0)
    xs = rng.normal(size=(40, 5)).astype(dtype)
    ya = a.run("k", xs)
    yb = np.concatenate([b.step(["k"], xs[t:t + 1]) for t in range(40)])
    np.testing.assert_allclose(ya, yb, atol=TOL[dtype], rtol=0)
    np.testing.assert_allclose(a.state("k"), b.state("k"), atol=TOL[dtype], rtol=0)
    ys_ref, s_ref = oracle.run(model, xs.astype(np.float64), s0.astype(dtype))
    np.testing.assert_allclose(ya, ys_ref, atol=TOL[dtype], rtol=0)
    np.testing.assert_allclose(a.state("k"), s_ref, atol=TOL[dtype], rtol=0)


def test_reset_close_reopen(dtype, kind):
    eng = Engine(small_model(kind=kind), dtype=dtype)
    x = np.ones((1, 5), dtype)
    y0 = eng.step(["k"], x)
    eng.step(["k"], x)
    eng.reset("k")
    assert not eng.state("k").any()
    np.testing.assert_array_equal(eng.step(["k"], x), y0)  # from zeros again
    eng.close("k")
    assert "k" not in eng and len(eng) == 0
    with pytest.raises(KeyError, match="unknown key 'k'"):
        eng.state("k")
    np.testing.assert_array_equal(eng.step(["k"], x), y0)  # reopened with zeros


def test_capacity_growth_mid_stream(dtype, regime, kind):
    model = small_model(seed=7, kind=kind)
    eng = Engine(model, dtype=dtype, capacity=1)
    rng = np.random.default_rng(5)
    ref = OracleStreams(model)
    for round_ in range(6):
        keys = [f"k{i}" for i in range(3 * round_ + 1)]  # more keys every round: forces growth
        x = rng.normal(size=(len(keys), 5))
        y = eng.step(keys, x)
        np.testing.assert_allclose(y, ref.step(keys, x.astype(dtype)),
                                   atol=TOL[dtype], rtol=0)
    assert eng.capacity >= 16 and len(eng) == 16


def test_set_state_and_open_with_state(dtype):
    model = GRUModel.random(3, [4, 4], seed=1)
    eng = Engine(model, dtype=dtype)
    st = np.arange(8, dtype=np.float64).reshape(2, 4) / 10  # (num_layers, hidden_size), C order
    eng.set_state("a", st)
    np.testing.assert_array_equal(eng.state("a"), st.ravel().astype(dtype))
    eng.open("b", st.ravel())
    np.testing.assert_array_equal(eng.state("b"), eng.state("a"))
    x = np.ones((1, 3))
    y, s = oracle.step(model, st.reshape(1, -1), x)
    np.testing.assert_allclose(eng.step(["a"], x), y, atol=TOL[dtype], rtol=0)
    with pytest.raises(KeyError, match="already open"):
        eng.open("b")


def test_save_load_state_round_trip(tmp_path, dtype, kind):
    model = small_model(kind=kind)
    eng = Engine(model, dtype=dtype)
    rng = np.random.default_rng(6)
    keys = [f"dev-{i}" for i in range(50)] + ["ünï", ""]
    eng.step(keys, rng.normal(size=(len(keys), 5)))
    eng.save_state(tmp_path / "s.st")
    other = Engine(model, dtype=dtype)
    other.step(["zzz"], np.ones((1, 5)))  # will be replaced
    other.load_state(tmp_path / "s.st")
    assert sorted(other.keys()) == sorted(keys)
    for k in keys:
        np.testing.assert_array_equal(other.state(k), eng.state(k))  # bit-exact
    x = rng.normal(size=(len(keys), 5))
    np.testing.assert_array_equal(other.step(keys, x), eng.step(keys, x))


def test_int_keys_as_array_and_list_agree():
    model = small_model()
    a, b = Engine(model), Engine(model)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    ya = a.step(np.array([10, 11, 10, 12], dtype=np.int32), x)
    yb = b.step([10, 11, 10, 12], x)
    np.testing.assert_array_equal(ya, yb)
    assert sorted(a.keys()) == [10, 11, 12] and all(type(k) is int for k in a.keys())


def test_ten_thousand_streams_interleaved_batches_match_oracle():
    """The issue's "done" scenario: a multi-layer model with dense layers before and after steps
    10,000 distinct streams in interleaved batches and matches the float64 oracle."""
    model = GRUModel.random(6, [16, 16], dense_before=[(12, "relu")],
                            dense_after=[(8, "tanh"), (4, "softmax")], seed=11)
    eng = Engine(model)
    rng = np.random.default_rng(7)
    n_streams = 10_000
    ref_state = np.zeros((n_streams, model.state_size))
    for _ in range(4):
        perm = rng.permutation(n_streams)
        for batch in np.array_split(perm, 7):  # interleaved, uneven batches, parallel kernel
            x = rng.normal(size=(len(batch), 6))
            y = eng.step(batch, x.astype(np.float32))
            y_ref, ref_state[batch] = oracle.step(model, ref_state[batch], x.astype(np.float32))
            np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=0)
    assert len(eng) == n_streams
    sample = rng.choice(n_streams, 200, replace=False)
    for k in sample:
        np.testing.assert_allclose(eng.state(int(k)), ref_state[k], atol=1e-5, rtol=0)


def test_no_recompilation_after_warmup():
    from streamgru import kernels

    model = small_model()
    eng = Engine(model)
    x1 = np.ones((1, 5), np.float32)
    xn = np.ones((100, 5), np.float32)
    eng.step(["a"], x1)
    eng.step([f"k{i}" for i in range(100)], xn)
    eng.run("a", np.ones((5, 5)))
    before = kernels.compiled_signatures()
    other = Engine(GRUModel.random(3, [9], dense_after=[(2, "relu")], seed=4))  # other shapes
    for xs in (np.ones((3, 3)), np.ones((2, 3), np.float64)[:, :3], np.ones((1, 3), np.float16)):
        other.step(["p", "q", "r"][:len(xs)], xs)
    ro = np.ones((2, 5), np.float32)
    ro.setflags(write=False)
    eng.step(["a", "b"], ro)
    eng.step(["a", "b"], np.ones((5, 2), np.float32).T)  # non-contiguous
    eng.step(["a"] * 70, np.ones((70, 5)))  # duplicates through the parallel path
    eng.run("b", np.ones((300, 5)))
    assert kernels.compiled_signatures() == before


def test_threads_from_several_callers_serialize():
    model = small_model()
    eng = Engine(model)
    ref = Engine(model)
    rng = np.random.default_rng(8)
    keys = [f"k{i}" for i in range(40)]
    batches = [(list(rng.choice(keys, 16)), rng.normal(size=(16, 5)).astype(np.float32))
               for _ in range(200)]
    log, log_lock = [], threading.Lock()

    def worker(part):
        for keys_, x in part:
            # Holding log_lock around the call records the order in which calls serialized.
            with log_lock:
                eng.step(keys_, x)
                log.append((keys_, x))

    threads = [threading.Thread(target=worker, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for keys_, x in log:
        ref.step(keys_, x)
    for k in keys:
        if k in ref:
            np.testing.assert_array_equal(eng.state(k), ref.state(k))


def test_concurrent_calls_without_external_lock_leave_consistent_state():
    """Four threads hammer overlapping keys; every stream must end up equal to feeding its rows
    in some serial order of the calls. With a per-key constant input, order does not matter for
    the count of steps, so each key's final state must equal `count` steps from zero."""
    model = small_model(seed=9)
    eng = Engine(model)
    keys = [f"k{i}" for i in range(10)]
    counts = {k: 0 for k in keys}
    rng = np.random.default_rng(9)
    plans = [[list(rng.choice(keys, 5, replace=False)) for _ in range(60)] for _ in range(4)]
    for plan in plans:
        for ks in plan:
            for k in ks:
                counts[k] += 1

    def worker(plan):
        for ks in plan:
            eng.step(ks, np.full((len(ks), 5), 0.5, np.float32))

    threads = [threading.Thread(target=worker, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in keys:
        ref = Engine(model)
        ref.run(k, np.full((counts[k], 5), 0.5, np.float32))
        np.testing.assert_allclose(eng.state(k), ref.state(k), atol=1e-6, rtol=0)


def test_readme_example_runs():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S)
    assert block, "README.md has no python example"
    exec(compile(block.group(1), "README.md", "exec"), {})


def test_version_and_exports():
    assert streamgru.__version__
    for name in ("GRUModel", "Engine", "load", "UnsupportedModelError"):
        assert hasattr(streamgru, name)


def test_int_array_batches_through_the_slot_table_match_list_batches(regime, kind):
    """Large int-array batches map keys through a compiled table; lists use the dict. Both must
    agree bit for bit through opens, closes, a refused (NaN) call and reopening."""
    model = small_model(seed=12, kind=kind)
    a, b = Engine(model, capacity=8), Engine(model, capacity=8)
    rng = np.random.default_rng(10)
    for step_ in range(12):
        keys = rng.choice(np.arange(-500, 500), size=int(rng.integers(64, 300)))  # duplicates too
        x = rng.normal(size=(len(keys), 5)).astype(np.float32)
        np.testing.assert_array_equal(a.step(keys, x), b.step(keys.tolist(), x))
        if step_ % 3 == 2:
            for k in rng.choice(sorted(a.keys()), size=20, replace=False):
                a.close(int(k))
                b.close(int(k))
        if step_ == 5:
            bad = x.copy()
            bad[-1, 0] = np.nan
            fresh = np.arange(10_000, 10_000 + len(keys))
            with pytest.raises(ValueError, match="expected finite values"):
                a.step(fresh, bad)
            assert not any(int(k) in a for k in fresh)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        np.testing.assert_array_equal(a.state(k), b.state(k))


@pytest.mark.parametrize("threads", [1, 2])
def test_one_event_path_equals_batch_path_for_every_input_form(dtype, threads, kind, monkeypatch):
    """One event of an open stream takes a fast path that calls the compiled kernel directly
    (threads=2 with a large-enough layer: the panel-parallel kernel). Every form of input must
    give exactly what the batch kernel gives for the same row, across state-array growth."""

    monkeypatch.setattr(engine_mod, "WIDE_MIN_MACS", 0)  # the panel-parallel kernel at threads=2
    model = small_model(seed=5, kind=kind)
    fast = Engine(model, dtype=dtype, capacity=2, threads=threads)
    ref = Engine(model, dtype=dtype, capacity=2, threads=threads)
    rng = np.random.default_rng(9)
    raw = bytearray(8 * 5 + 1)
    misaligned = np.frombuffer(raw, dtype, count=5, offset=1).reshape(1, 5)  # writable, unaligned
    for step in range(12):
        row = rng.normal(size=(1, 5)).astype(dtype)
        ro = row.copy()
        ro.setflags(write=False)
        misaligned[...] = row
        forms = [row, row.tolist(), row.astype(np.float64 if dtype == "float32" else np.float32),
                 ro, np.asfortranarray(np.repeat(row, 2, axis=0))[:1], misaligned]
        x = forms[step % len(forms)]
        key = step % 3
        y = fast.step([key], x)
        # the reference steps the same row in a batch with another stream (the batch kernels)
        xb = np.concatenate([np.asarray(x, dtype).reshape(1, 5), np.zeros((1, 5), dtype)])
        y_ref = ref.step([key, 1000 + step], xb)[:1]
        np.testing.assert_array_equal(y, y_ref)
        if step == 5:  # grow the state array under the cached entry points
            for eng in (fast, ref):
                eng.step([2000 + i for i in range(40)], np.zeros((40, 5), dtype))
    for key in range(3):
        np.testing.assert_array_equal(fast.state(key), ref.state(key))
    ks = fast._packed.kernels
    if hasattr(ks.step_one, "overloads"):  # compiled: the direct entry point was used
        assert (fast._run1 is not ks.step_one) or (fast._wide1 is not ks.step_wide)


def test_one_event_int_steps_match_oracle_through_close_reopen_and_growth():
    """The one-event path finds int keys through the store's hot dict: a closed key must never
    be served its old slot (now another stream's), whichever path opened or reopened it."""
    model = small_model()
    eng = Engine(model, capacity=2)
    rng = np.random.default_rng(3)
    ref = OracleStreams(model)
    for _ in range(300):
        k = int(rng.integers(-6, 10))
        if rng.random() < 0.15 and k in eng:
            eng.close(k)
            ref.states.pop(k)
            continue
        x = rng.normal(size=(1, 5)).astype(np.float32)
        y = eng.step([k] if rng.random() < 0.7 else np.array([k]), x)
        np.testing.assert_allclose(y, ref.step([k], x.astype(np.float64)),
                                   rtol=1e-4, atol=TOL["float32"])
    assert eng.capacity > 2 and sorted(eng.keys()) == sorted(ref.states)
