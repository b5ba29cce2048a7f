"""GRUModel / GRULayer / DenseLayer: construction, validation messages, freezing, fingerprint."""

import numpy as np
import pytest

from streamgru import DenseLayer, GRULayer, GRUModel


def arrays(I=16, H=128, dt=np.float32):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(3 * H, I)).astype(dt), rng.normal(size=(3 * H, H)).astype(dt))


def test_shapes_and_properties():
    W, R = arrays(16, 8)
    g = GRULayer(16, 8, W, R, linear_before_reset=0)
    d = DenseLayer(8, 3, np.ones((3, 8)), activation="softmax")
    m = GRUModel([DenseLayer(4, 16, np.ones((16, 4))), g, d])
    assert (m.input_size, m.output_size, m.state_size) == (4, 3, 8)
    assert m.state_slices == (slice(0, 8),)
    assert m.num_parameters == 16 * 4 + 16 + W.size + R.size + 2 * 24 + 3 * 8 + 3
    assert "GRULayer(input_size=16, hidden_size=8, linear_before_reset=0" in m.summary()


def test_weight_shape_message_names_argument_and_shapes():
    W, R = arrays()
    with pytest.raises(ValueError, match=r"W: expected shape \(384, 16\), got \(16, 384\)"):
        GRULayer(16, 128, W.T, R, linear_before_reset=1)
    with pytest.raises(ValueError, match=r"R: expected shape \(384, 128\), got \(384, 16\)"):
        GRULayer(16, 128, W, W, linear_before_reset=1)
    with pytest.raises(ValueError, match=r"Wb: expected shape \(384,\), got \(128,\)"):
        GRULayer(16, 128, W, R, np.zeros(128), linear_before_reset=1)


@pytest.mark.parametrize("bad,exc,msg", [
    (np.ones((384, 16), np.int32), TypeError, r"W: expected a float32 or float64 array, got "
                                               r"dtype int32; convert it with \.astype"),
    (np.ones((384, 16), complex), TypeError, "W: expected a float32 or float64 array"),
    (np.full((384, 16), np.nan), ValueError, r"W: expected finite values, got nan at index \(0, 0\)"),
    ("abc", TypeError, "W: expected a float32"),
])
def test_weight_dtype_and_finiteness(bad, exc, msg):
    _, R = arrays()
    with pytest.raises(exc, match=msg):
        GRULayer(16, 128, bad, R, linear_before_reset=1)


def test_linear_before_reset_is_required_and_checked():
    W, R = arrays(4, 2)
    with pytest.raises(TypeError, match="linear_before_reset"):
        GRULayer(4, 2, W, R)
    with pytest.raises(ValueError, match="linear_before_reset: expected 0 or 1"):
        GRULayer(4, 2, W, R, linear_before_reset=2)


@pytest.mark.parametrize("kw,exc,msg", [
    ({"f": "swish"}, ValueError, "f: expected one of"),
    ({"g": "softmax"}, ValueError, "g: expected one of"),
    ({"f": ("relu", 0.3)}, ValueError, "f: expected no alpha for relu"),
    ({"f": ("leakyrelu", 0.1, 0.2)}, ValueError, "f: expected no beta for leakyrelu"),
    ({"f": 3}, TypeError, "f: expected an activation name"),
    ({"clip": -1.0}, ValueError, "clip: expected a positive finite float or None, got -1.0"),
    ({"clip": "big"}, TypeError, "clip: expected a positive float or None"),
    ({"clip": float("inf")}, ValueError, "clip: expected a positive finite"),
])
def test_activation_and_clip_validation(kw, exc, msg):
    W, R = arrays(4, 2)
    with pytest.raises(exc, match=msg):
        GRULayer(4, 2, W, R, linear_before_reset=1, **kw)


def test_activation_defaults_follow_onnx():
    W, R = arrays(4, 2)
    g = GRULayer(4, 2, W, R, linear_before_reset=1, f="HardSigmoid", g=("LeakyRelu",))
    assert g.f == ("hardsigmoid", 0.2, 0.5)
    assert g.g == ("leakyrelu", 0.01, 0.0)


def test_model_chaining_errors():
    W, R = arrays(4, 2)
    g = GRULayer(4, 2, W, R, linear_before_reset=1)
    with pytest.raises(ValueError, match=r"layers\[1\]: expected input size 2 \(the output of "
                                         r"layers\[0\]\), got 3"):
        GRUModel([g, DenseLayer(3, 1, np.ones((1, 3)))])
    with pytest.raises(ValueError, match="at least one GRULayer, got only Dense"):
        GRUModel([DenseLayer(3, 1, np.ones((1, 3)))])
    with pytest.raises(ValueError, match="at least one GRULayer, got an empty list"):
        GRUModel([])
    with pytest.raises(TypeError, match=r"layers\[0\]: expected a GRULayer or DenseLayer, got str"):
        GRUModel(["gru"])
    with pytest.raises(TypeError, match="layers: expected a list"):
        GRUModel(g)


def test_weights_are_frozen_copies():
    W, R = arrays(4, 2)
    g = GRULayer(4, 2, W, R, linear_before_reset=1)
    W[0, 0] = 123.0
    assert g.W[0, 0] != 123.0
    with pytest.raises(ValueError):
        g.W[0, 0] = 1.0


def test_fingerprint_changes_with_any_weight_or_config():
    W, R = arrays(4, 2)
    base = GRUModel([GRULayer(4, 2, W, R, linear_before_reset=1)]).fingerprint
    W2 = W.copy()
    W2[1, 1] = np.nextafter(W2[1, 1], np.float32(np.inf))
    assert GRUModel([GRULayer(4, 2, W2, R, linear_before_reset=1)]).fingerprint != base
    assert GRUModel([GRULayer(4, 2, W, R, linear_before_reset=0)]).fingerprint != base
    assert GRUModel([GRULayer(4, 2, W, R, linear_before_reset=1)]).fingerprint == base


def test_nested_lists_and_float16_are_accepted():
    g = GRULayer(1, 1, [[0.1], [0.2], [0.3]], [[1], [2], [3]], linear_before_reset=1)
    assert g.W.dtype == np.float64 and g.R.dtype == np.float64
    g = GRULayer(1, 1, np.ones((3, 1), np.float16), np.ones((3, 1), np.float16),
                 linear_before_reset=1)
    assert g.W.dtype == np.float32


def test_random_model_is_seeded():
    a = GRUModel.random(3, [5, 5], dense_after=[(2, "softmax")], seed=3)
    b = GRUModel.random(3, [5, 5], dense_after=[(2, "softmax")], seed=3)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != GRUModel.random(3, [5, 5], dense_after=[(2, "softmax")]).fingerprint
