"""Model / GRULayer / LSTMLayer / DenseLayer and the layer protocol: construction, validation messages,
freezing, fingerprint, the kind registry, config round trips, casting, state layout."""

import json

import numpy as np
import oracle
import pytest
from helpers import Accumulator, LSTMSpec

import streamgru
from streamgru import LAYER_KINDS, DenseLayer, GRULayer, GRUModel, Layer, LSTMLayer, Model
from streamgru.errors import FormatError


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
    with pytest.raises(ValueError, match="at least one GRULayer or LSTMLayer, got only Dense"):
        GRUModel([DenseLayer(3, 1, np.ones((1, 3)))])
    with pytest.raises(ValueError, match="at least one GRULayer or LSTMLayer, got an empty list"):
        GRUModel([])
    with pytest.raises(TypeError, match=r"layers\[0\]: expected a GRULayer, LSTMLayer or "
                                        r"DenseLayer, got str"):
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


def test_random_model_cells():
    m = Model.random(3, [5, 4], cell=["lstm", "gru"], dense_after=[(2, "softmax")], seed=1)
    assert [layer.kind for layer in m.layers] == ["lstm", "gru", "dense"]
    assert m.state_size == 2 * 5 + 4 and m.held_output_slice == slice(10, 14)
    assert [layer.kind for layer in Model.random(3, [5, 4], cell="lstm").layers] == ["lstm"] * 2
    for bad in ("rnn", ["gru"], ["gru", "lstm", "gru"]):
        with pytest.raises(ValueError, match=r"cell: expected 'gru', 'lstm' or one of them per "
                                             r"hidden size \(2\), got"):
            Model.random(3, [5, 4], cell=bad)


def test_random_model_is_seeded():
    a = GRUModel.random(3, [5, 5], dense_after=[(2, "softmax")], seed=3)
    b = GRUModel.random(3, [5, 5], dense_after=[(2, "softmax")], seed=3)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != GRUModel.random(3, [5, 5], dense_after=[(2, "softmax")]).fingerprint


# ----------------------------------------------------------------------------------------------
# the layer protocol


def example_layers():
    """One layer of every registered kind, with every option away from its default."""
    rng = np.random.default_rng(1)
    return {
        "gru": GRULayer(3, 2, rng.normal(size=(6, 3)), rng.normal(size=(6, 2)), rng.normal(size=6),
                        rng.normal(size=6), linear_before_reset=0, f=("hardsigmoid", 0.3, 0.4),
                        g=("leakyrelu", 0.2), clip=4.0),
        "dense": DenseLayer(2, 5, rng.normal(size=(5, 2)), rng.normal(size=5),
                            activation=("elu", 0.5)),
        "lstm": LSTMSpec.random(3, 4, 1, proj_size=2, peepholes=True, clip=3.0, input_forget=1,
                                f=("hardsigmoid", 0.3, 0.4), g=("leakyrelu", 0.2, 0.0),
                                h=("scaledtanh", 1.5, 0.5)).layer(),
    }


def test_registry_holds_each_kind_once_and_model_is_the_public_name():
    assert LAYER_KINDS == {"gru": GRULayer, "dense": DenseLayer, "lstm": LSTMLayer}
    assert streamgru.LSTMLayer is LSTMLayer
    assert all(cls.kind == kind and issubclass(cls, Layer) for kind, cls in LAYER_KINDS.items())
    assert "accumulator" not in LAYER_KINDS  # register=False
    assert GRUModel is Model is streamgru.Model is streamgru.model.GRUModel
    # An example per kind below: a new kind without one fails here, not silently.
    assert set(example_layers()) == set(LAYER_KINDS)


def test_a_second_class_for_a_known_kind_is_refused():
    with pytest.raises(ValueError, match="expected a new layer kind, got 'gru', already "
                                         "registered by GRULayer"):
        type("OtherGRU", (Layer,), {"kind": "gru"})
    with pytest.raises(TypeError, match="expected a class attribute kind"):
        type("NoKind", (Layer,), {})
    assert LAYER_KINDS == {"gru": GRULayer, "dense": DenseLayer, "lstm": LSTMLayer}


@pytest.mark.parametrize("kind", sorted(LAYER_KINDS))
def test_config_round_trip_of_every_kind(kind):
    layer = example_layers()[kind]
    cfg = json.loads(json.dumps(layer.config()))  # what the native file stores
    assert cfg["kind"] == kind
    back = LAYER_KINDS[kind].from_config(cfg, layer.tensors())
    assert type(back) is type(layer) and back.config() == layer.config()
    for name, t in layer.tensors().items():
        assert back.tensors()[name].dtype == t.dtype
        np.testing.assert_array_equal(back.tensors()[name], t)
    assert (back.input_size, back.output_size, back.state_size) == \
        (layer.input_size, layer.output_size, layer.state_size)


@pytest.mark.parametrize("kind", sorted(LAYER_KINDS))
def test_astype_of_every_kind(kind):
    layer = example_layers()[kind]  # float64 (numpy's default)
    down = layer.astype("float32")
    assert type(down) is type(layer) and down.config() == layer.config()
    assert all(t.dtype == np.float32 for t in down.tensors().values())
    for name, t in layer.tensors().items():
        np.testing.assert_array_equal(down.tensors()[name], t.astype(np.float32))
        assert not down.tensors()[name].flags.writeable
    up = down.astype(np.float64)
    assert all(t.dtype == np.float64 for t in up.tensors().values())
    for name, t in down.tensors().items():
        np.testing.assert_array_equal(up.tensors()[name], t)  # exact: float32 fits float64
    with pytest.raises(ValueError, match="dtype: expected 'float32' or 'float64', got 'int32'"):
        layer.astype("int32")
    with pytest.raises(TypeError, match="dtype: expected 'float32' or 'float64'"):
        layer.astype("no such dtype")


def test_astype_refuses_a_weight_beyond_float32():
    layer = DenseLayer(1, 1, np.array([[1e300]]))
    with pytest.raises(ValueError, match=r"^W: expected values within float32's range, got max "
                                         r"\|v\| = 1e\+300; keep this layer in float64"):
        layer.astype(np.float32)
    m = Model([GRULayer(1, 1, np.ones((3, 1)), np.ones((3, 1)), linear_before_reset=1), layer])
    with pytest.raises(ValueError, match=r"^layers\[1\]\.W: expected values within float32"):
        m.astype("float32")


def test_model_astype_keeps_everything_but_the_dtype():
    m = Model.random(3, [4, 2], dense_after=[(2, "softmax")], dtype=np.float64)
    m32 = m.astype("float32")
    assert m32.dtype == np.float32 and m32.config() == m.config() and m32.source == m.source
    for (k, a), (k2, b) in zip(m.named_tensors().items(), m32.named_tensors().items(), strict=True):
        assert k == k2
        np.testing.assert_array_equal(b, a.astype(np.float32))
    assert m32.fingerprint != m.fingerprint


def test_state_slices_over_a_mixed_stack():
    rng = np.random.default_rng(0)

    def gru(i, h):
        return GRULayer(i, h, rng.normal(size=(3 * h, i)), rng.normal(size=(3 * h, h)),
                        linear_before_reset=1)

    acc = Accumulator(4, np.ones(4))
    layers = [DenseLayer(2, 3, np.ones((3, 2))), gru(3, 3), DenseLayer(3, 4, np.ones((4, 3))),
              acc, gru(4, 5), DenseLayer(5, 1, np.ones((1, 5)))]
    m = Model(layers)
    # GRU h (3), the accumulator's [sum; count] (2 * 4), GRU h (5), in layer order.
    assert m.state_slices == (slice(0, 3), slice(3, 11), slice(11, 16))
    assert m.state_size == 16
    assert m.recurrent_layers == (layers[1], acc, layers[4])
    assert m.gru_layers == (layers[1], layers[4])
    assert (m.input_size, m.output_size) == (2, 1)
    with pytest.raises(ValueError, match="at least one GRULayer or LSTMLayer, got only Dense "
                                         "layers"):
        Model([DenseLayer(3, 4, np.ones((4, 3))), DenseLayer(4, 4, np.ones((4, 4)))])


def test_work_estimate_of_each_kind():
    layers = example_layers()
    # GRU, I=3, H=2: input products 3H x I = 18, recurrent 3H x H = 12 multiply-adds per row.
    assert (layers["gru"].macs, layers["gru"].recurrent_macs) == (18 + 12, 12)
    # Dense 2 -> 5: 10 multiply-adds, none on a state.
    assert (layers["dense"].macs, layers["dense"].recurrent_macs) == (10, 0)
    # LSTM, I=3, H=4, proj_size=2, peepholes: input 4H x I = 48; on the state R 4H x 2 = 32,
    # peepholes 3H = 12, projection 2 x H = 8.
    assert (layers["lstm"].macs, layers["lstm"].recurrent_macs) == (48 + 52, 32 + 12 + 8)


def test_loader_refuses_an_unknown_kind_naming_it(tmp_path):
    rng = np.random.default_rng(0)
    m = Model([GRULayer(4, 4, rng.normal(size=(12, 4)), rng.normal(size=(12, 4)),
                        linear_before_reset=1), Accumulator(4, np.ones(4))])
    m.save(tmp_path / "m.sgru")  # as a newer streamgru that knows the kind would write it
    with pytest.raises(FormatError, match=r"m\.sgru: layers\[1\]: kind: expected one of "
                                          r"'dense', 'gru', 'lstm', got 'accumulator'.*upgrade"):
        streamgru.load(tmp_path / "m.sgru")


# --------------------------------------------------------------------------------------------
# LSTMLayer (streamgru.layers.lstm)

def lstm_arrays(I=3, H=4, H_out=4):
    rng = np.random.default_rng(2)
    return rng.normal(size=(4 * H, I)), rng.normal(size=(4 * H, H_out))


def test_lstm_layer_sizes_tensors_and_description():
    W, R = lstm_arrays()
    plain = LSTMLayer(3, 4, W, R)
    assert (plain.input_size, plain.hidden_size, plain.proj_size) == (3, 4, 0)
    assert (plain.output_size, plain.state_size) == (4, 8)  # h (4) then C (4)
    assert list(plain.tensors()) == ["W", "R", "Wb", "Rb"]
    assert not plain.Wb.any() and not plain.Rb.any() and plain.P is None and plain.proj is None
    assert (plain.f, plain.g, plain.h) == (("sigmoid", 0.0, 0.0), ("tanh", 0.0, 0.0),
                                           ("tanh", 0.0, 0.0))
    assert (plain.clip, plain.input_forget) == (None, 0)
    assert plain.describe() == ("lstm proj_size=0 f=sigmoid g=tanh h=tanh clip=off "
                                "peepholes=no input_forget=0")
    full = example_layers()["lstm"]
    assert (full.output_size, full.state_size) == (2, 2 + 4)
    assert list(full.tensors()) == ["W", "R", "Wb", "Rb", "P", "proj"]
    assert full.describe() == ("lstm proj_size=2 f=hardsigmoid(alpha=0.3, beta=0.4) "
                               "g=leakyrelu(alpha=0.2, beta=0) h=scaledtanh(alpha=1.5, beta=0.5) "
                               "clip=3.0 peepholes=yes input_forget=1")
    assert all(not t.flags.writeable for t in full.tensors().values())
    assert "LSTMLayer(input_size=3, hidden_size=4, proj_size=2, peepholes=True" in repr(full)


_W, _R = lstm_arrays()


@pytest.mark.parametrize("args, kw, exc, msg", [
    ((_W.T, _R), {}, ValueError, r"^W: expected shape \(16, 3\), got \(3, 16\)"),
    ((_W, _R[:, :2]), {}, ValueError, r"^R: expected shape \(16, 4\), got \(16, 2\)"),
    ((_W, _R, np.zeros(12)), {}, ValueError, r"^Wb: expected shape \(16,\), got \(12,\)"),
    ((_W, _R, None, np.zeros(3)), {}, ValueError, r"^Rb: expected shape \(16,\)"),
    ((_W, _R, None, None, np.zeros(16)), {}, ValueError, r"^P: expected shape \(12,\)"),
    ((_W, _R), {"proj_size": 2}, ValueError,
     r"^proj: expected an array of shape \(2, 4\) when proj_size > 0 and None when proj_size "
     r"== 0, got None with proj_size=2"),
    ((_W, _R, None, None, None, np.zeros((2, 4))), {}, ValueError,
     r"^proj: expected .* got an array with proj_size=0"),
    ((_W, _R, None, None, None, np.zeros((2, 4))), {"proj_size": 2}, ValueError,
     r"^R: expected shape \(16, 2\), got \(16, 4\)"),
    ((_W, _R[:, :2], None, None, None, np.zeros((4, 2))), {"proj_size": 2}, ValueError,
     r"^proj: expected shape \(2, 4\), got \(4, 2\)"),
    ((_W, _R), {"proj_size": -1}, ValueError, r"^proj_size: expected an int >= 0"),
    ((_W, _R), {"proj_size": True}, TypeError, r"^proj_size: expected an int >= 0"),
    ((_W, _R), {"proj_size": 2.0}, TypeError, r"^proj_size: expected an int >= 0"),
    ((_W, _R), {"input_forget": 2}, ValueError, r"^input_forget: expected 0 or 1"),
    ((_W, _R), {"clip": 0.0}, ValueError, r"^clip: expected a positive finite float"),
    ((_W, _R), {"h": "softmax"}, ValueError, r"^h: expected one of .*got 'softmax'"),
    ((_W, _R), {"g": ("relu", 0.5)}, ValueError, r"^g: expected no alpha for relu"),
    ((_W, _R), {"f": 3}, TypeError, r"^f: expected an activation name"),
    ((_W.astype(np.int64), _R), {}, TypeError, r"^W: expected a float32 or float64 array"),
    ((_W, np.where(np.eye(16, 4) > 0, np.nan, _R)), {}, ValueError,
     r"^R: expected finite values, got nan at index \(0, 0\)"),
])
def test_lstm_layer_refuses_bad_arguments_naming_them(args, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        LSTMLayer(3, 4, *args, **kw)


def test_lstm_from_config_refuses_tensors_its_config_does_not_announce():
    layer = example_layers()["lstm"]
    cfg, t = layer.config(), dict(layer.tensors())
    del t["P"]
    with pytest.raises(ValueError, match=r"^tensors: expected \['P', 'R', 'Rb', 'W', 'Wb', "
                                         r"'proj'\] for this configuration, got \['R', 'Rb', "
                                         r"'W', 'Wb', 'proj'\]"):
        LSTMLayer.from_config(cfg, t)
    plain = LSTMLayer(3, 4, *lstm_arrays())
    with pytest.raises(ValueError, match=r"^tensors: expected \['R', 'Rb', 'W', 'Wb'\]"):
        LSTMLayer.from_config(plain.config(), {**plain.tensors(), "P": np.zeros(12)})


def test_oracle_steps_an_lstm_layer_as_the_spec_of_its_tensors():
    """The class exposes what oracle.lstm_cell reads (W, R, Wb, Rb, P, proj, clip, input_forget,
    f, g, h) with the spec's meaning: same oracle step, bit for bit, in a mixed stack."""
    spec = LSTMSpec.random(3, 4, 7, proj_size=2, peepholes=True, clip=1.5,
                           g=("leakyrelu", 0.2, 0.0))
    layer = spec.layer()
    rng = np.random.default_rng(3)
    head = DenseLayer(2, 3, rng.normal(size=(3, 2)))
    s, x = rng.normal(size=(5, 6)), rng.normal(size=(5, 3))
    want = oracle.step([spec, head], s, x)
    got = oracle.step(Model([layer, head]), s, x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert np.abs(got[1] - s).max() > 0.1  # the state moved: a step that did nothing fails


def test_state_layout_of_a_mixed_gru_lstm_dense_stack():
    """Each LSTM layer's slice is its h (output_size) then its C (hidden_size), in layer order
    with the GRU layers': the oracle, stepping the whole model, reads and writes them there."""
    rng = np.random.default_rng(4)
    lstm_a = LSTMSpec.random(2, 4, 1, proj_size=3).layer()  # state 3 + 4
    gru = GRULayer(3, 5, rng.normal(size=(15, 3)), rng.normal(size=(15, 5)), linear_before_reset=1)
    lstm_b = LSTMSpec.random(5, 2, 2).layer()  # state 2 + 2
    layers = [DenseLayer(4, 2, rng.normal(size=(2, 4))), lstm_a, gru, lstm_b,
              DenseLayer(2, 1, rng.normal(size=(1, 2)))]
    m = Model(layers)
    assert m.state_slices == (slice(0, 7), slice(7, 12), slice(12, 16)) and m.state_size == 16
    assert m.recurrent_layers == (lstm_a, gru, lstm_b) and m.gru_layers == (gru,)
    s, x = rng.normal(size=(3, 16)), rng.normal(size=(3, 4))
    y, s2 = oracle.step(m, s, x)
    # The same step written out layer by layer, with the slices spelled out.
    v = oracle.dense(layers[0], x)
    h_a, c_a = oracle.lstm_cell(lstm_a, v, s[:, 0:3], s[:, 3:7])
    h_g = oracle.gru_cell(gru, h_a, s[:, 7:12])
    h_b, c_b = oracle.lstm_cell(lstm_b, h_g, s[:, 12:14], s[:, 14:16])
    np.testing.assert_array_equal(s2, np.concatenate([h_a, c_a, h_g, h_b, c_b], axis=1))
    np.testing.assert_array_equal(y, oracle.dense(layers[4], h_b))


# ----------------------------------------------------------------------------------------------
# compact weights: Model.compacted and Model.stored_as (forms from streamgru.compact, checked in
# tests/test_compact.py)

MATRICES = {"layers.0.W", "layers.1.W", "layers.1.R", "layers.1.proj", "layers.2.W", "layers.2.R",
            "layers.3.W"}


def compact_model(dtype=np.float32):
    """Dense -> LSTM (projection, peepholes) -> GRU -> Dense: every kind, every matrix name."""
    from helpers import mixed_lstm_model

    m = mixed_lstm_model(dtype)
    assert {k for k, t in m.named_tensors().items() if t.ndim == 2} == MATRICES
    return m


@pytest.mark.parametrize("weights", ["int8", "float16"])
def test_compacted_replaces_each_matrix_by_its_dequantized_form(weights):
    from streamgru import compact

    m = compact_model()
    c = m.compacted(weights)
    assert c.stored_as == weights and m.stored_as is None
    assert c.config() == m.config() and c.source == m.source
    assert c.notes[:-1] == m.notes and weights in c.notes[-1] and "approximate" in c.notes[-1]
    for (name, t), (name2, u) in zip(m.named_tensors().items(), c.named_tensors().items(),
                                     strict=True):
        assert name == name2 and u.dtype == np.float32 and not u.flags.writeable
        want = compact.dequantize(*compact.quantize(t, weights)) if name in MATRICES else t
        np.testing.assert_array_equal(u, want)  # bit for bit: the values are exact
        if name in MATRICES:
            assert not np.array_equal(u, t)  # these random weights do change
    assert c.fingerprint != m.fingerprint


def test_compacted_of_its_own_form_is_the_model_and_of_the_other_form_quantizes_again():
    from streamgru import compact

    m8 = compact_model().compacted("int8")
    assert m8.compacted("int8") is m8
    m16 = m8.compacted("float16")
    assert m16.stored_as == "float16" and len(m16.notes) == len(m8.notes) + 1
    for name in MATRICES:
        t = m8.named_tensors()[name]
        np.testing.assert_array_equal(m16.named_tensors()[name],
                                      compact.dequantize(*compact.quantize(t, "float16")))


@pytest.mark.parametrize("weights, exc, msg", [
    ("float32", ValueError, r"^weights: expected 'float16' or 'int8' \(a compact form\), got "
                            r"'float32'; full precision is the model itself$"),
    ("int4", ValueError, r"^weights: expected one of 'float32', 'float16', 'int8', got 'int4'$"),
    (np.int8, TypeError, r"^weights: expected one of 'float32', 'float16', 'int8', got type"),
])
def test_compacted_refuses_what_is_not_a_compact_form(weights, exc, msg):
    with pytest.raises(exc, match=msg):
        compact_model().compacted(weights)


def test_compacted_to_float16_refuses_a_weight_beyond_its_range_naming_it():
    m = Model([GRULayer(1, 1, np.ones((3, 1)), np.ones((3, 1)), linear_before_reset=1),
               DenseLayer(1, 1, np.array([[7e4]]))])
    with pytest.raises(ValueError, match=r"^layers\[1\]\.W: expected values within float16's "
                                         r"range \(\|v\| <= 65504\) for weights=\"float16\", got "
                                         r"max \|v\| = 7e\+04; use weights=\"int8\""):
        m.compacted("float16")
    assert m.compacted("int8").stored_as == "int8"


def test_stored_as_is_checked_when_a_model_is_built():
    m = compact_model()
    c = m.compacted("int8")
    assert Model(c.layers, stored_as="int8").stored_as == "int8"
    assert Model(c.layers).stored_as is None  # a new model from layers claims nothing
    with pytest.raises(ValueError, match=r"^stored_as: expected every weight matrix exactly in "
                                         r"int8 form, got layers\[0\]\.W that is not \(max "
                                         r"\|W - dequantize\(quantize\(W\)\)\| = .*\); build the "
                                         r"model with model\.compacted\('int8'\)$"):
        Model(m.layers, stored_as="int8")
    # int8's dequantized weights are not all float16 values: the claim is per form
    with pytest.raises(ValueError, match=r"^stored_as: expected every weight matrix exactly in "
                                         r"float16 form, got layers\[0\]\.W that is not"):
        Model(c.layers, stored_as="float16")
    with pytest.raises(ValueError, match=r"^stored_as: expected 'float16' or 'int8' \(a compact "
                                         r"form\), got 'float32'"):
        Model(c.layers, stored_as="float32")
    with pytest.raises(TypeError, match=r"^stored_as: expected one of"):
        Model(c.layers, stored_as=True)
    big = Model([GRULayer(1, 1, np.full((3, 1), 1e5), np.ones((3, 1)), linear_before_reset=1)])
    with pytest.raises(ValueError, match=r"^stored_as: expected every weight matrix exactly in "
                                         r"float16 form, got layers\[0\]\.W: expected values "
                                         r"within float16's range"):
        Model(big.layers, stored_as="float16")


@pytest.mark.parametrize("weights", ["int8", "float16"])
def test_astype_keeps_stored_as_since_the_values_are_unchanged(weights):
    c = compact_model().compacted(weights)
    c64 = c.astype("float64")
    assert c64.stored_as == weights and c64.dtype == np.float64
    back = c64.astype("float32")
    assert back.stored_as == weights and back.fingerprint == c.fingerprint


def test_compacted_float64_model_keeps_its_dtype_with_the_same_values():
    m64 = compact_model(np.float64)
    c64 = m64.compacted("int8")
    assert c64.dtype == np.float64 and c64.stored_as == "int8"
    # int8 quantizes in float32: the same matrices as compacting the float32 model
    c32 = m64.astype("float32").compacted("int8")
    for name in MATRICES:
        np.testing.assert_array_equal(c64.named_tensors()[name], c32.named_tensors()[name])
    for name in set(m64.named_tensors()) - MATRICES:
        np.testing.assert_array_equal(c64.named_tensors()[name], m64.named_tensors()[name])


def test_stored_as_survives_pickling_and_shows_in_repr():
    import pickle

    c = compact_model().compacted("int8")
    back = pickle.loads(pickle.dumps(c))
    assert back.stored_as == "int8" and back.fingerprint == c.fingerprint
    assert repr(c).endswith(", stored_as='int8')") and "stored_as" not in repr(compact_model())


def test_weight_bytes_counts_matrices_in_each_form_and_vectors_in_float32():
    from streamgru import compact

    m = compact_model(np.float64)
    for weights in ("float32", "float16", "int8"):
        want = []
        for layer in m.layers:
            want.append(sum(compact.stored_bytes(t.shape, weights) if t.ndim == 2 else 4 * t.size
                            for t in layer.tensors().values()))
        assert m.weight_bytes(weights) == tuple(want)
    W = m.layers[3].W  # Dense (2, 3) and a bias of 2
    assert m.weight_bytes("int8")[3] == W.size + 4 * 2 + 4 * 2
    assert m.weight_bytes("float16")[3] == 2 * W.size + 4 * 2
