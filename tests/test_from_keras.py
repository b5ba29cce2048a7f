"""converters.from_keras against Keras's own stored outputs (tests/fixtures, made by
tests/fixtures/make_fixtures.py with Keras 3.15.1); no Keras or TensorFlow needed here."""

import json
import pathlib
import re
import shutil
import zipfile

import helpers
import numpy as np
import oracle
import pytest

from converters.from_keras import from_keras
from streamgru.errors import UnsupportedModelError
from streamgru.model import DenseLayer, GRULayer

h5py = pytest.importorskip("h5py")

FIX = pathlib.Path(__file__).parent / "fixtures"
MODELS = [
    "keras_seq_reset_after.keras",
    "keras_func_reset_before.keras",
    "keras_legacy_hard_sigmoid.h5",
    "keras_nobias_relu.keras",
    "keras2_legacy_hard_sigmoid.h5",
]


def _ref(name):
    return np.load(FIX / (name.rsplit(".", 1)[0] + ".npz"))


# --- conversions against Keras -----------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_oracle_matches_keras_every_step(name):
    model = from_keras(FIX / name)
    ref = _ref(name)
    assert model.input_size == ref["x"].shape[2]
    assert model.output_size == ref["y"].shape[2]
    assert model.state_size == ref["h0"].shape[1]
    assert oracle.max_error_vs_reference(model, ref) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", MODELS)
def test_engine_matches_keras_every_step(name, dtype):
    # Keras ran in float32: both engine dtypes are held to float32 tolerance.
    helpers.assert_matches_reference(from_keras(FIX / name), _ref(name),
                                     helpers.engine_streams(dtype))


def test_layer_mapping_reset_after_true():
    model = from_keras(FIX / "keras_seq_reset_after.keras")
    kinds = [type(layer) for layer in model.layers]
    assert kinds == [DenseLayer, GRULayer, GRULayer, DenseLayer]
    assert model.layers[0].activation[0] == "relu"
    assert model.layers[3].activation[0] == "softmax"
    for gru in model.gru_layers:
        assert gru.linear_before_reset == 1
        assert gru.f == ("sigmoid", 0.0, 0.0) and gru.g == ("tanh", 0.0, 0.0)
        assert np.any(gru.Rb != 0)
    assert model.source == "keras 3.15.1"
    assert model.dtype == np.float32


def test_layer_mapping_reset_after_false():
    model = from_keras(FIX / "keras_func_reset_before.keras")
    gru, head = model.layers
    assert gru.linear_before_reset == 0
    assert np.all(gru.Rb == 0) and np.any(gru.Wb != 0)
    assert head.activation[0] == "tanh" and head.out_features == 3


def test_hard_sigmoid_keras3_is_x_over_6():
    model = from_keras(FIX / "keras_legacy_hard_sigmoid.h5")
    for gru in model.gru_layers:
        assert gru.f == ("hardsigmoid", pytest.approx(1 / 6), 0.5)
    assert [g.linear_before_reset for g in model.gru_layers] == [1, 0]
    assert model.layers[-1].activation == ("elu", 1.0, 0.0)


def test_hard_sigmoid_keras2_is_0_2():
    model = from_keras(FIX / "keras2_legacy_hard_sigmoid.h5")
    assert model.gru_layers[0].f == ("hardsigmoid", 0.2, 0.5)
    assert model.source == "keras 2.15.0"


@pytest.mark.parametrize("name", ["keras_legacy_hard_sigmoid.h5",
                                  "keras_lstm_legacy_hard_sigmoid.h5"])
def test_hard_sigmoid_follows_the_writer_version(tmp_path, name):
    # The same Keras 3 file (GRU, LSTM) claiming to come from Keras 2 maps hard_sigmoid to
    # 0.2x+0.5, which no longer reproduces Keras 3's outputs: the version is really what decides
    # the mapping.
    dst = tmp_path / "as_keras2.h5"
    shutil.copy(FIX / name, dst)
    with h5py.File(dst, "r+") as f:
        f.attrs["keras_version"] = "2.15.0"
    model = from_keras(dst)
    assert model.recurrent_layers[0].f[1] == 0.2
    assert oracle.max_error_vs_reference(model, _ref(name)) > 1e-3


def test_hard_sigmoid_without_version_is_refused(tmp_path):
    dst = tmp_path / "noversion.h5"
    shutil.copy(FIX / "keras_legacy_hard_sigmoid.h5", dst)
    with h5py.File(dst, "r+") as f:
        del f.attrs["keras_version"]
        del f["model_weights"].attrs["keras_version"]
    with pytest.raises(UnsupportedModelError,
                       match=r"layer 'gru_\d+' \(GRU\): recurrent_activation='hard_sigmoid' "
                             r"means .* does not say which Keras"):
        from_keras(dst)


def test_no_bias_and_relu_candidate():
    model = from_keras(FIX / "keras_nobias_relu.keras")
    gru, head = model.layers
    assert gru.g[0] == "relu"
    assert not gru.Wb.any() and not gru.Rb.any()
    assert not head.b.any() and head.activation[0] == "softplus"


@pytest.mark.parametrize("dtype", ["float64", np.float64])
def test_dtype_float64(dtype):
    model = from_keras(FIX / "keras_seq_reset_after.keras", dtype=dtype)
    assert model.dtype == np.float64
    assert oracle.max_error_vs_reference(model, _ref("keras_seq_reset_after.keras")) < 1e-5


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype: expected None, 'float32' or 'float64', got 'int32'"):
        from_keras(FIX / "keras_seq_reset_after.keras", dtype="int32")
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got int"):
        from_keras(3)
    with pytest.raises(FileNotFoundError, match="path: expected an existing Keras model file"):
        from_keras(tmp_path / "missing.keras")
    txt = tmp_path / "model.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match="neither a zip archive nor HDF5"):
        from_keras(txt)
    weights_only = tmp_path / "w.weights.h5"
    with h5py.File(weights_only, "w") as f:
        f.create_dataset("kernel", data=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="weights-only file has no architecture"):
        from_keras(weights_only)


# --- refusals from real Keras files --------------------------------------------------------------

@pytest.mark.parametrize("name, pattern", [
    ("keras_bidirectional.keras", r"layer 'bidirectional' \(Bidirectional\): Bidirectional needs "
                                  r"the whole sequence"),
    ("keras_lambda.keras", r"layer 'lambda' \(Lambda\): a Lambda layer is Python code.*never "
                           r"executes"),
    ("keras_masking.keras", r"layer 'masking' \(Masking\): Masking makes a GRU or LSTM skip "
                            r"masked"),
    ("keras_lstm_go_backwards.keras", r"layer 'lstm(_\d+)?' \(LSTM\): go_backwards=True reads the "
                                      r"sequence from its end"),
    ("keras_bidirectional_lstm.keras", r"layer 'bidirectional(_\d+)?' \(Bidirectional\): "
                                       r"Bidirectional needs the whole sequence"),
])
def test_refused_layers(name, pattern):
    with pytest.raises(UnsupportedModelError, match=pattern):
        from_keras(FIX / name)


# --- refusals and acceptances by editing a real config ------------------------------------------

def _edit_keras(src, dst, edit):
    """Copy a .keras archive with its config.json passed through ``edit(config)``."""
    with zipfile.ZipFile(FIX / src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "config.json":
                cfg = json.loads(data)
                edit(cfg)
                data = json.dumps(cfg).encode()
            zout.writestr(item, data)
    return dst


def _edit_h5(src, dst, edit):
    shutil.copy(FIX / src, dst)
    with h5py.File(dst, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        edit(cfg)
        f.attrs["model_config"] = json.dumps(cfg)
    return dst


def _seq_layer(cfg, class_name, k=0):
    return [lay for lay in cfg["config"]["layers"] if lay["class_name"] == class_name][k]


def _gru_cfg(cfg, k=0):
    return _seq_layer(cfg, "GRU", k)["config"]


def _set(key, value, k=0):
    def edit(cfg):
        _gru_cfg(cfg, k)[key] = value
    return edit


@pytest.mark.parametrize("edit, pattern", [
    (_set("go_backwards", True), r"layer 'gru' \(GRU\): go_backwards=True reads the sequence"),
    (_set("return_state", True), r"layer 'gru' \(GRU\): return_state=True passes \[output, "
                                 r"state\] to the next layer"),
    (_set("some_future_option", 1), r"layer 'gru' \(GRU\): configuration keys "
                                    r"\['some_future_option'\] are not implemented"),
    (_set("activation", "gelu"), r"layer 'gru' \(GRU\): activation='gelu' has no streamgru "
                                 r"equivalent"),
    (_set("activation", "softmax"), r"layer 'gru' \(GRU\): activation='softmax' has no"),
    (_set("recurrent_activation", "selu", 1), r"layer 'gru_1' \(GRU\): "
                                              r"recurrent_activation='selu' has no"),
    (_set("activation", {"module": "my_pkg", "class_name": "function", "config": "swoosh",
                         "registered_name": "swoosh"}),
     r"layer 'gru' \(GRU\): activation is a custom object"),
])
def test_refused_gru_attributes(tmp_path, edit, pattern):
    path = _edit_keras("keras_seq_reset_after.keras", tmp_path / "m.keras", edit)
    with pytest.raises(UnsupportedModelError, match=pattern):
        from_keras(path)


def test_reset_after_missing_is_refused(tmp_path):
    def edit(cfg):
        del _gru_cfg(cfg)["reset_after"]
    path = _edit_keras("keras_seq_reset_after.keras", tmp_path / "m.keras", edit)
    with pytest.raises(UnsupportedModelError, match=r"layer 'gru' \(GRU\): reset_after is not "
                                                    r"stated.*never guesses"):
        from_keras(path)


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: _seq_layer(c, "Dense")["config"].update(activation="mish"),
     r"layer 'dense' \(Dense\): activation='mish' has no streamgru equivalent"),
    (lambda c: _seq_layer(c, "Dense")["config"].update(quantization_config={"mode": "int8"}),
     r"layer 'dense' \(Dense\): a quantized Dense layer"),
    (lambda c: _seq_layer(c, "Dense")["config"].update(lora_rank=4),
     r"layer 'dense' \(Dense\): a LoRA Dense layer"),
    (lambda c: _seq_layer(c, "Dense").update(module="my_pkg.layers",
                                             registered_name="my_pkg>Dense"),
     r"layer 'dense' \(Dense\): a custom class \(module 'my_pkg.layers'"),
    (lambda c: _seq_layer(c, "Dense").update(class_name="SimpleRNN"),
     r"layer 'dense' \(SimpleRNN\): unsupported layer class 'SimpleRNN'; expected GRU, LSTM, "
     r"Dense"),
    (lambda c: c["config"]["layers"].insert(1, {"module": "keras", "class_name": "Sequential",
                                                "config": {"name": "inner", "layers": []}}),
     r"layer 'inner' \(Sequential\): a nested model"),
    (lambda c: c.update(class_name="MyModel", module="my_pkg"),
     r"model: a custom class|model: expected a Sequential"),
])
def test_refused_layers_by_config(tmp_path, edit, pattern):
    path = _edit_keras("keras_seq_reset_after.keras", tmp_path / "m.keras", edit)
    with pytest.raises(UnsupportedModelError, match=pattern):
        from_keras(path)


def test_subclassed_model_is_refused(tmp_path):
    path = _edit_keras("keras_seq_reset_after.keras", tmp_path / "m.keras",
                       lambda c: c.update(class_name="MyModel"))
    with pytest.raises(UnsupportedModelError, match="model: expected a Sequential or functional "
                                                    "Model, got class 'MyModel'"):
        from_keras(path)


@pytest.mark.parametrize("key, value", [
    ("stateful", True), ("dropout", 0.5), ("recurrent_dropout", 0.3), ("unroll", True),
    ("return_sequences", False),
])
def test_accepted_gru_attributes_change_nothing(tmp_path, key, value):
    base = from_keras(FIX / "keras_seq_reset_after.keras")
    path = _edit_keras("keras_seq_reset_after.keras", tmp_path / "m.keras", _set(key, value, 1))
    assert from_keras(path).fingerprint == base.fingerprint


def test_dropout_layer_is_identity(tmp_path):
    base = from_keras(FIX / "keras_seq_reset_after.keras")

    def edit(cfg):
        cfg["config"]["layers"].insert(3, {"module": "keras.layers", "class_name": "Dropout",
                                           "config": {"name": "drop", "rate": 0.5, "seed": None,
                                                      "noise_shape": None, "trainable": True,
                                                      "dtype": "float32"}})
    path = _edit_keras("keras_seq_reset_after.keras", tmp_path / "m.keras", edit)
    assert from_keras(path).fingerprint == base.fingerprint


def test_activation_layer_folds_into_linear_dense(tmp_path):
    # Legacy model: TimeDistributed(Dense(2)) is linear, so a following Activation folds into it.
    def edit(cfg):
        cfg["config"]["layers"].insert(4, {"class_name": "Activation", "config": {
            "name": "act", "trainable": True, "dtype": "float32", "activation": "relu"}})
    base = from_keras(FIX / "keras_legacy_hard_sigmoid.h5")
    model = from_keras(_edit_h5("keras_legacy_hard_sigmoid.h5", tmp_path / "m.h5", edit))
    assert len(model.layers) == len(base.layers)
    assert base.layers[2].activation[0] == "identity"
    assert model.layers[2].activation[0] == "relu"
    np.testing.assert_array_equal(model.layers[2].W, base.layers[2].W)


def test_activation_layer_after_gru_adds_identity_dense(tmp_path):
    def edit(cfg):
        cfg["config"]["layers"].insert(3, {"module": "keras.layers", "class_name": "Activation",
                                           "config": {"name": "act", "activation": "tanh"}})
    base = from_keras(FIX / "keras_seq_reset_after.keras")
    model = from_keras(_edit_keras("keras_seq_reset_after.keras", tmp_path / "m.keras", edit))
    # config index 3 is after the first GRU (index 0 is the InputLayer)
    extra = model.layers[2]
    assert len(model.layers) == len(base.layers) + 1
    assert isinstance(extra, DenseLayer) and extra.activation[0] == "tanh"
    np.testing.assert_array_equal(extra.W, np.eye(8))
    x = _ref("keras_seq_reset_after.keras")["x"][0]
    # The extra layer is tanh applied to the first GRU's output, checked with the oracle.
    h1 = oracle.run(type(base)(base.layers[:2]), x)[0]
    np.testing.assert_allclose(oracle.run(type(model)(model.layers[:3]), x)[0], np.tanh(h1),
                               rtol=0, atol=1e-12)


# --- functional graphs ---------------------------------------------------------------------------

def _func_layer(cfg, name):
    return [lay for lay in cfg["config"]["layers"] if lay["name"] == name][0]


def test_functional_branch_is_refused(tmp_path):
    def edit(cfg):
        node = _func_layer(cfg, "head")["inbound_nodes"][0]
        node["args"][0]["config"]["keras_history"] = ["signal", 0, 0]
    path = _edit_keras("keras_func_reset_before.keras", tmp_path / "m.keras", edit)
    with pytest.raises(UnsupportedModelError,
                       match=r"layer 'signal': expected one consumer \(a plain chain\), got "
                             r"\['encoder', 'head'\]"):
        from_keras(path)


@pytest.mark.parametrize("kwarg, value, message", [
    ("constants", [1], r"expected a plain call layer\(x\), got extra call arguments \['constants'\]"),
    ("initial_state", [1], r"expected initial_state to be a model input tensor, got 1"),
])
def test_functional_call_arguments_we_cannot_map_are_refused(tmp_path, kwarg, value, message):
    def edit(cfg):
        _func_layer(cfg, "encoder")["inbound_nodes"][0]["kwargs"][kwarg] = value
    path = _edit_keras("keras_func_reset_before.keras", tmp_path / "m.keras", edit)
    with pytest.raises(UnsupportedModelError, match=r"layer 'encoder' \(GRU\): " + message):
        from_keras(path)


def test_functional_two_outputs_is_refused(tmp_path):
    def edit(cfg):
        cfg["config"]["output_layers"] = [["encoder", 0, 0], ["head", 0, 0]]
    path = _edit_keras("keras_func_reset_before.keras", tmp_path / "m.keras", edit)
    with pytest.raises(UnsupportedModelError, match="model: expected one data input and one output"):
        from_keras(path)


def test_functional_renamed_layers_still_find_their_weights():
    # The functional fixture names its layers "encoder"/"head", not the storage keys "gru" /
    # "time_distributed": the weights are still found (and the shapes check it).
    model = from_keras(FIX / "keras_func_reset_before.keras")
    assert model.layers[0].hidden_size == 7


@pytest.mark.parametrize("name, layer, bias, expected", [
    ("keras2_legacy_hard_sigmoid.h5", "gru", np.zeros(15, np.float32),
     r"layer 'gru' \(GRU\): expected bias of shape \(2, 15\) \(reset_after=True\), got \(15,\)"),
    ("keras2_lstm_state.h5", "lstm", np.zeros((2, 16), np.float32),
     r"layer 'lstm' \(LSTM\): expected bias of shape \(16,\), got \(2, 16\)"),
])
def test_legacy_weight_shape_mismatch(tmp_path, name, layer, bias, expected):
    dst = tmp_path / "bad.h5"
    shutil.copy(FIX / name, dst)
    with h5py.File(dst, "r+") as f:
        g = f[f"model_weights/{layer}"]
        del g[f"{layer}/{layer}_cell/bias:0"]
        g.create_dataset(f"{layer}/{layer}_cell/bias:0", data=bias)
    with pytest.raises(ValueError, match=expected):
        from_keras(dst)


# --- LSTM ----------------------------------------------------------------------------------------
# The engine has no LSTM kernel cell yet: the float64 oracle (checked against torch and
# onnxruntime in test_oracle.py) steps the converted models as its stand-in; the engine's runs
# join by themselves once LSTMLayer.runnable is True (helpers.LSTM_RUNS).

LSTM_MODELS = [
    "keras_lstm_seq.keras",
    "keras_lstm_state.keras",
    "keras_lstm_mixed.keras",
    "keras_lstm_legacy_hard_sigmoid.h5",
    "keras2_lstm_state.h5",
]


@pytest.mark.parametrize("run", helpers.LSTM_RUNS)
@pytest.mark.parametrize("name", LSTM_MODELS)
def test_lstm_models_match_keras_every_step(name, run):
    model = from_keras(FIX / name)
    ref = _ref(name)
    assert any(layer.kind == "lstm" for layer in model.layers)
    assert (model.input_size, model.output_size, model.state_size) == (
        ref["x"].shape[2], ref["y"].shape[2], ref["h0"].shape[1])
    helpers.assert_matches_reference(model, ref, run)


def test_lstm_float64_weights():
    model = from_keras(FIX / "keras_lstm_mixed.keras", dtype="float64")
    assert model.dtype == np.float64
    helpers.assert_matches_reference(model, _ref("keras_lstm_mixed.keras"))


def test_lstm_layer_mapping():
    seq = from_keras(FIX / "keras_lstm_seq.keras")
    assert [layer.kind for layer in seq.layers] == ["lstm", "lstm", "dense"]
    for lstm in seq.layers[:2]:
        assert (lstm.f[0], lstm.g[0], lstm.h[0]) == ("sigmoid", "tanh", "tanh")
        assert lstm.P is None and lstm.proj is None and lstm.clip is None
        assert not lstm.input_forget
        assert lstm.Wb.any() and not lstm.Rb.any()  # Keras's one bias is Wb
    assert [lstm.state_size for lstm in seq.layers[:2]] == [10, 8]
    assert seq.source == "keras 3.15.1"

    mixed = from_keras(FIX / "keras_lstm_mixed.keras")
    assert [layer.kind for layer in mixed.layers] == ["dense", "gru", "lstm", "dense", "lstm",
                                                      "dense"]
    assert not mixed.layers[4].Wb.any()  # use_bias=False

    legacy = from_keras(FIX / "keras_lstm_legacy_hard_sigmoid.h5")
    for lstm in legacy.layers[:2]:
        assert lstm.f == ("hardsigmoid", pytest.approx(1 / 6), 0.5)
    assert legacy.layers[0].g[0] == legacy.layers[0].h[0] == "softsign"

    keras2 = from_keras(FIX / "keras2_lstm_state.h5")
    assert keras2.layers[0].f == ("hardsigmoid", 0.2, 0.5)
    assert keras2.source == "keras 2.15.0"


@pytest.mark.parametrize("name", ["keras_lstm_state.keras", "keras2_lstm_state.h5"])
def test_lstm_state_inputs_and_outputs_are_reported(name):
    notes = from_keras(FIX / name).notes
    for pattern in (r"model input 'h0' is the initial state h of layer 'lstm' \(LSTM\): taken as "
                    r"the per-stream state",
                    r"model input 'c0' is the initial state C of layer 'lstm' \(LSTM\)",
                    r"model output 'lstm' \(output 1\) returns the state h of layer 'lstm'.*"
                    r"ignored",
                    r"model output 'lstm' \(output 2\) returns the state C of layer 'lstm'",
                    r"layer 'lstm' \(LSTM\): its state is elements 0:(10|8) of a stream's state: "
                    r"h 0:(5|4), then C (5|4):(10|8)"):
        assert any(re.search(pattern, n) for n in notes), (pattern, notes)


def test_lstm_state_position_notes_in_a_mixed_stack():
    notes = from_keras(FIX / "keras_lstm_mixed.keras").notes
    assert "layer 'gru' (GRU): its state is elements 0:5 of a stream's state" in notes
    assert any(re.search(r"\(LSTM\): its state is elements 5:17 of a stream's state: h 5:11, "
                         r"then C 11:17", n) for n in notes)
    assert any(re.search(r"\(LSTM\): its state is elements 17:23 .*h 17:20, then C 20:23", n)
               for n in notes)


# Refusals of LSTM models by edits of a real config (the real LSTM refusal files are in
# test_refused_layers above).

def _set_lstm(key, value, k=0):
    def edit(cfg):
        _seq_layer(cfg, "LSTM", k)["config"][key] = value
    return edit


@pytest.mark.parametrize("edit, pattern", [
    (_set_lstm("go_backwards", True), r"layer 'lstm' \(LSTM\): go_backwards=True"),
    (_set_lstm("return_state", True), r"layer 'lstm' \(LSTM\): return_state=True passes "
                                      r"\[output, state\] to the next layer"),
    (_set_lstm("reset_after", True), r"layer 'lstm' \(LSTM\): configuration keys "
                                     r"\['reset_after'\] are not implemented"),
    (_set_lstm("some_future_option", 1, 1), r"layer 'lstm_1' \(LSTM\): configuration keys "
                                            r"\['some_future_option'\] are not implemented"),
    (_set_lstm("activation", "gelu"), r"layer 'lstm' \(LSTM\): activation='gelu' has no "
                                      r"streamgru equivalent"),
    (_set_lstm("activation", "softmax", 1), r"layer 'lstm_1' \(LSTM\): activation='softmax' has "
                                            r"no"),
    (_set_lstm("recurrent_activation", "selu"), r"layer 'lstm' \(LSTM\): "
                                                r"recurrent_activation='selu' has no"),
    (_set_lstm("recurrent_activation", {"module": "my_pkg", "class_name": "function",
                                        "config": "gate", "registered_name": "gate"}),
     r"layer 'lstm' \(LSTM\): recurrent_activation is a custom object"),
])
def test_refused_lstm_attributes(tmp_path, edit, pattern):
    path = _edit_keras("keras_lstm_seq.keras", tmp_path / "m.keras", edit)
    with pytest.raises(UnsupportedModelError, match=pattern):
        from_keras(path)


@pytest.mark.parametrize("key, value", [
    ("stateful", True), ("dropout", 0.5), ("recurrent_dropout", 0.3), ("unroll", True),
    ("unit_forget_bias", False), ("return_sequences", False),
])
def test_accepted_lstm_attributes_change_nothing(tmp_path, key, value):
    base = from_keras(FIX / "keras_lstm_seq.keras")
    path = _edit_keras("keras_lstm_seq.keras", tmp_path / "m.keras", _set_lstm(key, value, 1))
    model = from_keras(path)
    assert model.fingerprint == base.fingerprint
    if key == "stateful":
        assert any("layer 'lstm_1' (LSTM) is stateful=True" in n for n in model.notes)


def test_lstm_use_bias_false_reads_no_bias(tmp_path):
    # The same weights without use_bias: the file's third array is then one too many.
    path = _edit_keras("keras_lstm_seq.keras", tmp_path / "m.keras", _set_lstm("use_bias", False))
    with pytest.raises(ValueError, match=r"layer 'lstm' \(LSTM\): expected 2 weight arrays "
                                         r"\(kernel, recurrent_kernel\), got 3"):
        from_keras(path)


def _lstm_call(cfg):
    return _func_layer(cfg, "lstm")["inbound_nodes"][0]


def test_lstm_initial_state_needs_h_and_c(tmp_path):
    def edit(cfg):
        _lstm_call(cfg)["kwargs"]["initial_state"] = _lstm_call(cfg)["kwargs"]["initial_state"][:1]
    path = _edit_keras("keras_lstm_state.keras", tmp_path / "m.keras", edit)
    with pytest.raises(UnsupportedModelError,
                       match=r"layer 'lstm' \(LSTM\): expected initial_state to hold 2 tensor\(s\) "
                             r"\(state h, state C\), got 1: \['h0'\]"):
        from_keras(path)

    def edit2(cfg):  # tf.keras 2 records the call on [x, h0]: the same refusal
        del _lstm_call(cfg)[2]
    path = _edit_h5("keras2_lstm_state.h5", tmp_path / "m.h5", edit2)
    with pytest.raises(UnsupportedModelError, match=r"expected initial_state to hold 2 tensor"):
        from_keras(path)


def test_lstm_state_input_used_twice_is_refused(tmp_path):
    def edit(cfg):
        init = _lstm_call(cfg)["kwargs"]["initial_state"]
        init[1] = init[0]
    path = _edit_keras("keras_lstm_state.keras", tmp_path / "m.keras", edit)
    with pytest.raises(UnsupportedModelError,
                       match=r"layer 'lstm' \(LSTM\): expected initial_state to be a model input "
                             r"of its own .*got 'h0', which also starts layer 'lstm'"):
        from_keras(path)
