"""converters.from_rtneural against Keras's stored outputs: the RTNeural JSON fixtures were
written from the Keras fixture models by a port of RTNeural's own exporter
(tests/fixtures/make_fixtures.py)."""

import copy
import json
import pathlib

import helpers
import numpy as np
import oracle
import pytest

from converters.from_keras import from_keras
from converters.from_rtneural import from_rtneural, is_rtneural_json
from streamgru.errors import FormatError, UnsupportedModelError
from streamgru.model import DenseLayer

FIX = pathlib.Path(__file__).parent / "fixtures"
PAIRS = [
    ("rtneural_seq_reset_after.json", "keras_seq_reset_after"),
    ("rtneural_func_reset_before.json", "keras_func_reset_before"),
]


def _doc(name="rtneural_seq_reset_after.json"):
    return json.loads((FIX / name).read_text())


@pytest.mark.parametrize("name, ref", PAIRS)
def test_oracle_matches_keras_every_step(name, ref):
    model = from_rtneural(FIX / name)
    assert model.source == "rtneural"
    assert model.dtype == np.float32
    assert oracle.max_error_vs_reference(model, np.load(FIX / f"{ref}.npz")) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, ref", PAIRS)
def test_engine_matches_keras_every_step(name, ref, dtype):
    helpers.assert_matches_reference(from_rtneural(FIX / name), np.load(FIX / f"{ref}.npz"),
                                     helpers.engine_streams(dtype))


@pytest.mark.parametrize("name, ref", PAIRS)
def test_same_weights_as_the_keras_file(name, ref):
    # float32 weights written as JSON decimals come back bit-exact.
    a = from_rtneural(FIX / name)
    b = from_keras(FIX / (ref + ".keras"))
    assert a.fingerprint == b.fingerprint


def test_dict_input_and_float64():
    doc = _doc()
    assert from_rtneural(doc).fingerprint == from_rtneural(FIX / "rtneural_seq_reset_after.json"
                                                           ).fingerprint
    m64 = from_rtneural(doc, dtype="float64")
    assert m64.dtype == np.float64
    assert oracle.max_error_vs_reference(m64, np.load(FIX / "keras_seq_reset_after.npz")) < 1e-5


def test_bias_layouts():
    seq = from_rtneural(FIX / "rtneural_seq_reset_after.json")
    assert [g.linear_before_reset for g in seq.gru_layers] == [1, 1]
    func = from_rtneural(FIX / "rtneural_func_reset_before.json")
    gru = func.gru_layers[0]
    assert gru.linear_before_reset == 0 and not gru.Rb.any() and gru.Wb.any()
    assert gru.f[0] == "sigmoid" and gru.g[0] == "tanh"


def test_is_rtneural_json():
    assert is_rtneural_json(_doc())
    assert is_rtneural_json(_doc("rtneural_func_reset_before.json"))
    assert not is_rtneural_json({"gru.weight_ih_l0": [[0.1]], "gru.weight_hh_l0": [[0.2]]})
    assert not is_rtneural_json({"in_shape": [None, 1], "layers": [{"type": "gru"}]})
    assert not is_rtneural_json([1, 2])
    assert not is_rtneural_json("in_shape")


def test_dense_without_bias_and_absent_activation():
    doc = _doc()
    doc["layers"][-1]["weights"] = doc["layers"][-1]["weights"][:1]
    del doc["layers"][1]["activation"]  # a GRU without the field: RTNeural's tanh
    model = from_rtneural(doc)
    assert not model.layers[-1].b.any()
    assert model.layers[1].g[0] == "tanh"


def test_standalone_activation_layers():
    doc = _doc()
    dense0 = doc["layers"][0]
    dense0["activation"] = ""
    act = {"type": "activation", "activation": "relu", "shape": dense0["shape"], "weights": []}
    after_gru = {"type": "activation", "activation": "sigmoid", "shape": [None, None, 8],
                 "weights": []}
    doc["layers"][1:1] = [act]
    doc["layers"][3:3] = [after_gru]
    model = from_rtneural(doc)
    base = from_rtneural(_doc())
    # relu folds into the now-linear first Dense: same model as the original.
    assert model.layers[0].activation == base.layers[0].activation
    np.testing.assert_array_equal(model.layers[0].W, base.layers[0].W)
    # sigmoid after a GRU becomes an identity Dense carrying it.
    extra = model.layers[2]
    assert isinstance(extra, DenseLayer) and extra.activation[0] == "sigmoid"
    np.testing.assert_array_equal(extra.W, np.eye(8, dtype=np.float32))
    assert len(model.layers) == len(base.layers) + 1


def _with(edit, name="rtneural_seq_reset_after.json"):
    doc = copy.deepcopy(_doc(name))
    edit(doc)
    return doc


@pytest.mark.parametrize("kind, why", [
    ("conv1d", "convolutions need a window"),
    ("conv2d", "convolutions need a window"),
    ("prelu", "PReLU has a learned per-channel slope"),
    ("batchnorm", "batch normalisation"),
    ("batchnorm2d", "batch normalisation"),
    ("attention", "unknown layer type; expected gru, lstm, dense"),
])
def test_refused_layer_types(kind, why):
    doc = _with(lambda d: d["layers"][2].update(type=kind))
    with pytest.raises(UnsupportedModelError, match=rf"layers\[2\] \('{kind}'\): .*{why}"):
        from_rtneural(doc)


@pytest.mark.parametrize("act", ["", "relu", "sigmoid"])
def test_refused_gru_activation(act):
    doc = _with(lambda d: d["layers"][1].update(activation=act))
    with pytest.raises(UnsupportedModelError,
                       match=rf"layers\[1\] \('gru'\): activation '{act}': RTNeural's GRU always "
                             rf"uses tanh"):
        from_rtneural(doc)


def test_refused_dense_activation():
    doc = _with(lambda d: d["layers"][3].update(activation="gelu"))
    with pytest.raises(UnsupportedModelError,
                       match=r"layers\[3\] \('dense'\): activation 'gelu' is not one RTNeural "
                             r"defines"):
        from_rtneural(doc)


def test_refused_gru_without_bias():
    doc = _with(lambda d: d["layers"][1].update(weights=d["layers"][1]["weights"][:2]))
    with pytest.raises(UnsupportedModelError,
                       match=r"layers\[1\] \('gru'\): no bias array, so reset_after"):
        from_rtneural(doc)


def test_refused_unknown_key():
    doc = _with(lambda d: d["layers"][0].update(kernel_size=[3]))
    with pytest.raises(UnsupportedModelError,
                       match=r"layers\[0\] \('dense'\): keys \['kernel_size'\] are not "
                             r"implemented"):
        from_rtneural(doc)


def test_refused_4d_input():
    doc = _with(lambda d: d.update(in_shape=[None, None, 3, 1]))
    with pytest.raises(UnsupportedModelError, match=r"in_shape: a 4-d \(conv2d\) shape"):
        from_rtneural(doc)


def test_shape_errors():
    doc = _with(lambda d: d["layers"][1]["shape"].__setitem__(-1, 9))
    with pytest.raises(ValueError, match=r"layers\[1\] \('gru'\) kernel \(weights\[0\]\): "
                                         r"expected shape \(6, 27\), got \(6, 24\)"):
        from_rtneural(doc)
    doc = _with(lambda d: d["layers"][1]["weights"].__setitem__(2, [[0.0] * 24]))
    with pytest.raises(ValueError, match=r"layers\[1\] \('gru'\) bias \(weights\[2\]\): expected "
                                         r"shape \(2, 24\) or \(24,\), got \(1, 24\)"):
        from_rtneural(doc)
    doc = _with(lambda d: d["layers"][0]["weights"].__setitem__(0, [[1.0, 2.0], [3.0]]))
    with pytest.raises(ValueError, match=r"layers\[0\] \('dense'\) kernel \(weights\[0\]\): "
                                         r"expected a nested list of numbers"):
        from_rtneural(doc)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"path_or_dict: expected an RTNeural model JSON .*got "
                                         r"\['gru.weight_hh_l0'"):
        from_rtneural({"gru.weight_hh_l0": [[0.0]]})
    with pytest.raises(TypeError, match="path_or_dict: expected a path or a dict, got int"):
        from_rtneural(5)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FormatError, match="path_or_dict: expected a JSON file, got .*bad.json' "
                                          "that is not valid JSON"):
        from_rtneural(bad)
    with pytest.raises(ValueError, match="dtype: expected None, 'float32' or 'float64', got 'int8'"):
        from_rtneural(_doc(), dtype="int8")
    only_dense = {"in_shape": [None, 2], "layers": [
        {"type": "dense", "activation": "", "shape": [None, 1], "weights": [[[1.0], [2.0]], [0.0]]}
    ]}
    with pytest.raises(UnsupportedModelError, match="layers: expected at least one gru or lstm "
                                                    "layer, got none"):
        from_rtneural(only_dense)


# --- LSTM ----------------------------------------------------------------------------------------
# The engine has no LSTM kernel cell yet: the float64 oracle steps the converted models as its
# stand-in; the engine's runs join by themselves once LSTMLayer.runnable is True
# (helpers.LSTM_RUNS).

LSTM_PAIRS = [
    ("rtneural_lstm_seq.json", "keras_lstm_seq"),
    ("rtneural_lstm_mixed.json", "keras_lstm_mixed"),
]


@pytest.mark.parametrize("run", helpers.LSTM_RUNS)
@pytest.mark.parametrize("name, ref", LSTM_PAIRS)
def test_lstm_matches_keras_every_step(name, ref, run):
    model = from_rtneural(FIX / name)
    assert model.source == "rtneural" and model.dtype == np.float32
    helpers.assert_matches_reference(model, np.load(FIX / f"{ref}.npz"), run)


@pytest.mark.parametrize("name, ref", LSTM_PAIRS)
def test_lstm_same_weights_as_the_keras_file(name, ref):
    assert from_rtneural(FIX / name).fingerprint == from_keras(FIX / f"{ref}.keras").fingerprint


def test_lstm_layers():
    model = from_rtneural(FIX / "rtneural_lstm_mixed.json")
    assert [layer.kind for layer in model.layers] == ["dense", "gru", "lstm", "dense", "lstm",
                                                      "dense"]
    for lstm in (model.layers[2], model.layers[4]):
        assert (lstm.f[0], lstm.g[0], lstm.h[0]) == ("sigmoid", "tanh", "tanh")
        assert lstm.P is None and lstm.proj is None and lstm.clip is None
        assert not lstm.Rb.any()
    assert model.layers[2].Wb.any()
    assert not model.layers[4].Wb.any()  # exported without a bias array (use_bias=False)
    assert model.state_size == 5 + 2 * 6 + 2 * 3
    m64 = from_rtneural(FIX / "rtneural_lstm_mixed.json", dtype="float64")
    assert m64.dtype == np.float64
    helpers.assert_matches_reference(m64, np.load(FIX / "keras_lstm_mixed.npz"))


@pytest.mark.parametrize("act", ["", "relu", "sigmoid"])
def test_refused_lstm_activation(act):
    doc = _with(lambda d: d["layers"][0].update(activation=act), "rtneural_lstm_seq.json")
    with pytest.raises(UnsupportedModelError,
                       match=rf"layers\[0\] \('lstm'\): activation '{act}': RTNeural's LSTM always "
                             rf"uses tanh"):
        from_rtneural(doc)


def test_lstm_absent_activation_is_tanh():
    doc = _with(lambda d: d["layers"][0].pop("activation"), "rtneural_lstm_seq.json")
    assert from_rtneural(doc).fingerprint == from_rtneural(_doc("rtneural_lstm_seq.json")).fingerprint


def test_lstm_shape_errors():
    doc = _with(lambda d: d["layers"][1]["shape"].__setitem__(-1, 5), "rtneural_lstm_seq.json")
    with pytest.raises(ValueError, match=r"layers\[1\] \('lstm'\) kernel \(weights\[0\]\): "
                                         r"expected shape \(5, 20\), got \(5, 16\)"):
        from_rtneural(doc)
    doc = _with(lambda d: d["layers"][0]["weights"].__setitem__(2, [[0.0] * 20] * 2),
                "rtneural_lstm_seq.json")
    with pytest.raises(ValueError, match=r"layers\[0\] \('lstm'\) bias \(weights\[2\]\): "
                                         r"expected shape \(20,\), got \(2, 20\)"):
        from_rtneural(doc)
    for n in (1, 4):
        doc = _with(lambda d, n=n: d["layers"][0].update(weights=(d["layers"][0]["weights"] * 2)[:n]),
                    "rtneural_lstm_seq.json")
        with pytest.raises(ValueError, match=rf"layers\[0\] \('lstm'\): expected weights \[kernel, "
                                             rf"recurrent_kernel, bias\], got {n} arrays"):
            from_rtneural(doc)
