"""streamgru.compact: the float16 and int8 weight forms, checked against their definitions."""

import numpy as np
import pytest

from streamgru import compact


def matrices(seed, n=300):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        W = (rng.normal(size=(int(rng.integers(1, 40)), int(rng.integers(1, 40))))
             * rng.uniform(1e-4, 50)).astype(np.float32)
        if rng.random() < 0.3:
            W[rng.integers(0, W.shape[0])] = 0.0  # an all-zero row
        yield W


def test_int8_is_symmetric_per_row_within_half_a_step():
    for W in matrices(0):
        q, s = compact.quantize_int8(W)
        assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (W.shape[0],)
        assert np.abs(q.astype(int)).max() <= 127
        top = np.abs(W).max(axis=1)
        # the scale is the row's largest magnitude over 127 (to float32 rounding), 1 for zeros
        np.testing.assert_allclose(s[top > 0], top[top > 0] / 127, rtol=3e-7)
        assert (s[top == 0] == 1).all() and not q[top == 0].any()
        # every weight within half a step of its dequantized value (and float32 rounding)
        err = np.abs(W.astype(np.float64) - q.astype(np.float64) * s[:, None])
        assert (err <= s[:, None] * (0.5 + 1e-5)).all()
        # the largest weight of each nonzero row uses the full range
        assert (np.abs(q[top > 0].astype(int)).max(axis=1) == 127).all()


@pytest.mark.parametrize("fmt", ["int8", "float16", "float32"])
def test_dequantized_weights_quantize_back_to_the_same_bits(fmt):
    """A compact file stores the quantized form and loads as its float32 dequantization: an
    engine quantizing that again must get exactly the stored values."""
    for W in matrices(1):
        stored, scales = compact.quantize(W, fmt)
        again, scales2 = compact.quantize(compact.dequantize(stored, scales), fmt)
        np.testing.assert_array_equal(again, stored)
        if fmt == "int8":
            np.testing.assert_array_equal(scales2, scales)
        else:
            assert scales is None and scales2 is None


def test_float16_rounds_to_nearest_and_refuses_values_past_its_range():
    W = np.array([[1.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504.0]], np.float32)
    h, _ = compact.quantize(W, "float16")
    assert h.dtype == np.float16
    assert h.astype(np.float32).tolist() == [[1.0, 1.0, 1 + 2 ** -9, 65504.0]]  # ties to even
    with pytest.raises(ValueError, match=r"W: expected values within float16's range .*got max "
                                         r"\|v\| = 7e\+04; use weights=\"int8\""):
        compact.quantize(np.array([[70000.0]]), "float16")


def test_weights_format_names_the_argument():
    assert compact.weights_format("float16") == "float16"
    with pytest.raises(ValueError, match=r"weights: expected one of 'float32', 'float16', "
                                         r"'int8', got 'int4'"):
        compact.weights_format("int4")
    with pytest.raises(TypeError, match=r"weights: expected one of .*got type np.float16|"
                                        r"weights: expected one of .*got type"):
        compact.weights_format(np.float16)


def test_stored_bytes():
    assert compact.stored_bytes((12, 5), "float32") == 240
    assert compact.stored_bytes((12, 5), "float16") == 120
    assert compact.stored_bytes((12, 5), "int8") == 60 + 48


# ----------------------------------------------------------------------------------------------
# the engine with compact weights: against the float64 oracle on the dequantized model


def _mixed_model():
    from helpers import LSTMSpec

    from streamgru import DenseLayer, GRULayer, Model

    rng = np.random.default_rng(60)

    def gru(I, H, lbr):
        s = 1 / np.sqrt(H)
        return GRULayer(I, H, rng.uniform(-s, s, (3 * H, I)), rng.uniform(-s, s, (3 * H, H)),
                        rng.uniform(-s, s, 3 * H), rng.uniform(-s, s, 3 * H),
                        linear_before_reset=lbr)

    return Model([DenseLayer(5, 12, rng.normal(size=(12, 5)) * 0.4, rng.normal(size=12) * 0.1,
                             "relu"),
                  gru(12, 40, 0),
                  LSTMSpec.random(40, 24, 61, proj_size=10, peepholes=True).layer(),
                  gru(10, 33, 1),
                  DenseLayer(33, 3, rng.normal(size=(3, 33)) * 0.4, None, "softmax")])


@pytest.mark.nojit
@pytest.mark.parametrize("weights", ["float16", "int8"])
@pytest.mark.parametrize("regime", ["serial", "parallel", "wide", "one"])
def test_every_step_path_matches_the_oracle_on_the_dequantized_model(weights, regime,
                                                                      monkeypatch):
    from helpers import check_against_oracle

    check_against_oracle(_mixed_model(), "float32", steps=25, n=70 if regime == "parallel" else 5,
                         regime=regime, monkeypatch=monkeypatch, weights=weights)


@pytest.mark.parametrize("weights", ["float16", "int8"])
@pytest.mark.parametrize("wide", [False, True])
def test_run_and_duplicate_keys_with_compact_weights(weights, wide, monkeypatch):
    """run (input products over all steps first) against the oracle; a batch with repeated keys
    equal, bit for bit, to the same events one call each."""
    import oracle
    from helpers import dequantized

    from streamgru import Engine
    from streamgru import engine as engine_mod

    if wide:
        monkeypatch.setattr(engine_mod, "RUN_WIDE_MIN_MACS", 1)
        monkeypatch.setattr(engine_mod, "WIDE_MIN_MACS", 0)
    model = _mixed_model()
    ref = dequantized(model, weights)
    rng = np.random.default_rng(62)
    a, b = Engine(model, weights=weights, threads=2), Engine(model, weights=weights, threads=2)
    s0 = rng.normal(size=model.state_size) * 0.5
    a.open(99, s0)
    xs = rng.normal(size=(30, 5)).astype(np.float32)
    ys_ref, s_ref = oracle.run(ref, xs.astype(np.float64), s0.astype(np.float32))
    np.testing.assert_allclose(a.run(99, xs), ys_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(a.state(99), s_ref, atol=1e-5, rtol=0)
    keys = [3, 1, 3, 3, 2, 1, 0, 3] * 9
    x = rng.normal(size=(len(keys), 5)).astype(np.float32)
    y = a.step(keys, x)
    y_sep = np.concatenate([b.step([k], x[i:i + 1]) for i, k in enumerate(keys)])
    np.testing.assert_array_equal(y, y_sep)


def test_compact_weights_are_an_approximation_and_snapshots_do_not_depend_on_them(tmp_path):
    """The outputs differ from the float32 engine's by the weights' rounding (int8 more than
    float16), and a state saved by an int8 engine loads into a float32 engine of the same
    model (the snapshot names the model, not the weights form)."""
    from streamgru import Engine

    model = _mixed_model().astype("float32")
    rng = np.random.default_rng(63)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    engines = {w: Engine(model, weights=w) for w in ("float32", "float16", "int8")}
    ys = {w: np.concatenate([e.step([0], x[t:t + 1]) for t in range(40)])
          for w, e in engines.items()}
    d16, d8 = (np.abs(ys[w] - ys["float32"]).max() for w in ("float16", "int8"))
    assert 0 < d16 < d8 < 0.05
    assert {w: e.weights for w, e in engines.items()} == {w: w for w in engines}
    assert "weights='int8'" in repr(engines["int8"])
    engines["int8"].save_state(tmp_path / "s.sgst")
    full = Engine(model)
    full.load_state(tmp_path / "s.sgst")
    np.testing.assert_array_equal(full.state(0), engines["int8"].state(0))


def test_the_weights_argument_is_checked():
    from streamgru import Engine, Model

    model = Model.random(3, 8)
    with pytest.raises(ValueError, match=r'weights: expected "float64" \(or None\) for a float64 '
                                         r"engine, got 'int8'; compact weights run float32 "
                                         r'arithmetic: use dtype="float32"'):
        Engine(model, dtype="float64", weights="int8")
    with pytest.raises(ValueError, match=r"weights: expected one of 'float32', 'float16', 'int8', "
                                         r"got 'int4'"):
        Engine(model, weights="int4")
    with pytest.raises(TypeError, match=r"weights: expected one of"):
        Engine(model, weights=8)
    assert Engine(model, dtype="float64").weights == "float64"
    assert Engine(model).weights == "float32"
    gru = model.layers[0]
    big = Model([type(gru).from_config(gru.config(), {**gru.tensors(), "W": gru.W * 1e6})])
    with pytest.raises(ValueError, match=r"weights: expected weight matrices within float16's "
                                         r"range .*got layer 0 \(gru\) tensor W with max "
                                         r"\|v\| = .*; use weights=\"int8\""):
        Engine(big, weights="float16")
    assert Engine(big, weights="int8").weights == "int8"  # int8 scales any range


@pytest.mark.parametrize("weights", ["float16", "int8"])
def test_a_compact_file_runs_as_the_engine_that_wrote_it(tmp_path, weights):
    """model.save(path, weights=...) then load: an Engine of the loaded model runs the stored
    form by default, with the same bits as Engine(model, weights=...) (quantization is
    idempotent, streamgru.compact), and the file's matrices are smaller."""
    from streamgru import Engine, load

    model = _mixed_model().astype("float32")
    model.save(tmp_path / "full.sgru")
    model.save(tmp_path / "small.sgru", weights=weights)
    small = load(tmp_path / "small.sgru")
    assert small.stored_as == weights
    a, b = Engine(model, weights=weights), Engine(small)
    assert b.weights == weights
    x = np.random.default_rng(64).normal(size=(30, 5)).astype(np.float32)
    keys = [0, 1, 2] * 10
    np.testing.assert_array_equal(a.step(keys, x), b.step(keys, x))
    np.testing.assert_array_equal(a.run(7, x), b.run(7, x))
    assert (tmp_path / "small.sgru").stat().st_size < (tmp_path / "full.sgru").stat().st_size
