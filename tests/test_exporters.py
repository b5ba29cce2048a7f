"""converters.to_onnx and converters.to_torch: one step for a batch, ``(x, state) -> (y,
state_out)``, checked against the float64 oracle and the engine with onnxruntime and torch
running the exported graph and module, on models that together use every activation (with
alpha/beta), clip, both linear_before_reset values and Dense layers between GRU layers.
"""

import numpy as np
import oracle
import pytest
from helpers import Accumulator, LSTMSpec

import converters
from streamgru import Engine
from streamgru.errors import UnsupportedModelError
from streamgru.model import DenseLayer, GRULayer, GRUModel

STEPS, STREAMS = 4, 5


def _layers(spec, input_size, seed, dtype):
    """Layers from ("gru", H, f, g, lbr, clip) / ("dense", out, activation), small weights."""
    rng = np.random.default_rng(seed)
    layers, width = [], input_size

    def u(*shape):
        return rng.uniform(-0.6, 0.6, shape).astype(dtype)

    for item in spec:
        if item[0] == "gru":
            _, H, f, g, lbr, clip = item
            layers.append(GRULayer(width, H, u(3 * H, width), u(3 * H, H), u(3 * H), u(3 * H),
                                   linear_before_reset=lbr, f=f, g=g, clip=clip))
        else:
            _, H, act = item
            layers.append(DenseLayer(width, H, u(H, width), u(H), act))
        width = H
    return GRUModel(layers)


# Together: all 12 GRU activations in f or g, all 13 Dense activations, clip, both lbr values.
SPECS = {
    "gates": [("dense", 4, ("scaledtanh", 0.7, 1.3)),
              ("gru", 5, ("hardsigmoid", 0.3, 0.45), ("leakyrelu", 0.2), 0, 1.5),
              ("dense", 6, ("affine", 0.5, 0.2)),
              ("gru", 4, "sigmoid", "tanh", 1, None),
              ("dense", 5, ("elu", 0.7)),
              ("gru", 3, "identity", "softsign", 1, 3.0),
              ("dense", 2, "softmax")],
    "more": [("gru", 4, "relu", "softplus", 0, None),
             ("dense", 5, ("hardsigmoid", 0.25, 0.4)),
             ("gru", 3, ("affine", 0.5, 0.5), ("scaledtanh", 0.9, 1.1), 1, None),
             ("dense", 4, ("thresholdedrelu", 0.1)),
             ("gru", 4, ("thresholdedrelu", 0.05), ("elu", 1.2), 0, 0.8),
             ("dense", 4, ("leakyrelu", 0.05)), ("dense", 4, "relu"), ("dense", 4, "softsign"),
             ("dense", 4, "softplus"), ("dense", 4, "sigmoid"), ("dense", 4, "tanh"),
             ("dense", 3, "identity")],
    "plain_lbr0": [("gru", 6, "sigmoid", "tanh", 0, None)],
}


def _model(name, dtype=np.float32):
    return _layers(SPECS[name], 3, seed=len(name), dtype=dtype)


def _inputs(model, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(STEPS, STREAMS, model.input_size)).astype(np.float32)
    state0 = rng.uniform(-0.5, 0.5, (STREAMS, model.state_size)).astype(np.float32)
    return xs, state0


def _oracle_steps(model, xs, state0):
    """Every step's (y, state) from the float64 oracle, the state carried from step to step."""
    out, s = [], state0.astype(np.float64)
    for x in xs:
        y, s = oracle.step(model, s, x)
        out.append((y, s))
    return out


def _engine_steps(model, xs, state0, dtype):
    eng = Engine(model, dtype=dtype)
    keys = list(range(STREAMS))
    for k in keys:
        eng.open(k, state0[k])
    out = []
    for x in xs:
        y = eng.step(keys, x)
        out.append((y, np.stack([eng.state(k) for k in keys])))
    return out


def _run_steps(forward, xs, state0):
    """Feed each step's state_out back as the next step's state."""
    out, s = [], state0
    for x in xs:
        y, s = forward(x, s)
        out.append((y, s))
    return out


def _torch_step(net, dtype):
    """``forward(x, s) -> (y, s')`` in numpy through the exported module ``net``."""
    import torch

    def forward(x, s):
        with torch.no_grad():
            y, s2 = net(torch.from_numpy(x.astype(dtype)), torch.from_numpy(s.astype(dtype)))
        return y.numpy(), s2.numpy()
    return forward


def _close(got, want, atol):
    for t, ((y, s), (y_ref, s_ref)) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(y, y_ref, atol=atol, rtol=0, err_msg=f"y at step {t}")
        np.testing.assert_allclose(s, s_ref, atol=atol, rtol=0, err_msg=f"state at step {t}")


def _ort_forward(onnx_model):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x, s: sess.run(["y", "state_out"], {"x": x, "state": s})


@pytest.mark.parametrize("name", sorted(SPECS))
def test_onnx_export_runs_in_onnxruntime_as_the_oracle_and_the_engine(name):
    pytest.importorskip("onnx")
    model = _model(name)
    xs, state0 = _inputs(model)
    got = _run_steps(_ort_forward(converters.to_onnx(model)), xs, state0)
    _close(got, _oracle_steps(model, xs, state0), atol=1e-5)
    _close(got, _engine_steps(model, xs, state0, "float32"), atol=1e-5)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_export_runs_as_the_oracle_and_the_engine(name, dtype):
    pytest.importorskip("torch")
    model = _model(name, np.dtype(dtype))
    net = converters.to_torch(model)
    xs, state0 = _inputs(model)
    forward = _torch_step(net, dtype)

    got = _run_steps(forward, xs, state0)
    assert got[0][0].dtype == np.dtype(dtype)
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    _close(got, _oracle_steps(model, xs, state0), atol=tol)
    _close(got, _engine_steps(model, xs, state0, dtype), atol=max(tol, 1e-9))


def test_torch_export_uses_grucell_where_torch_runs_the_layer_natively():
    torch = pytest.importorskip("torch")
    net = converters.to_torch(_model("gates"))
    cells = [m for m in net.layers if isinstance(m, torch.nn.GRUCell)]
    assert len(cells) == 1 and cells[0].hidden_size == 4  # the sigmoid/tanh, lbr=1, no-clip layer
    # and torch's importer reads that cell back to the same canonical weights
    back = converters.from_torch(cells[0])
    np.testing.assert_array_equal(back.layers[0].W, _model("gates").layers[3].W)


def test_onnx_sequence_export_equals_the_oracle_run():
    pytest.importorskip("onnx")
    model = _model("gates")
    xs, state0 = _inputs(model)
    forward = _ort_forward(converters.to_onnx(model, sequence=True))
    ys, state = forward(xs, state0)  # (T, batch, ...): the whole sequence in one call
    ref = _oracle_steps(model, xs, state0)
    np.testing.assert_allclose(ys, np.stack([y for y, _ in ref]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(state, ref[-1][1], atol=1e-5, rtol=0)


def test_onnx_export_writes_the_file_and_reads_back_through_from_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = _model("more")
    path = tmp_path / "m.onnx"
    proto = converters.to_onnx(model, path, opset=18)
    assert onnx.load(str(path)) == proto
    assert proto.opset_import[0].version == 18
    assert [i.name for i in proto.graph.input] == ["x", "state"]
    assert [o.name for o in proto.graph.output] == ["y", "state_out"]
    back = converters.from_onnx(str(path))
    xs, state0 = _inputs(model)
    # from_onnx folds some Dense activations into their neighbours: compare what they compute.
    _close(_oracle_steps(back, xs, state0), _oracle_steps(model, xs, state0), atol=1e-6)


def test_exporters_refuse_bad_arguments():
    pytest.importorskip("onnx")
    model = _model("plain_lbr0")
    with pytest.raises(TypeError, match=r"^model: expected a GRUModel, got str"):
        converters.to_onnx("m.sgru")
    with pytest.raises(ValueError, match=r"^opset: expected 14 or later"):
        converters.to_onnx(model, opset=13)
    with pytest.raises(TypeError, match=r"^opset: expected an int, got '17'"):
        converters.to_onnx(model, opset="17")
    with pytest.raises(TypeError, match=r"^sequence: expected a bool, got 1"):
        converters.to_onnx(model, sequence=1)
    pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"^model: expected a GRUModel, got list"):
        converters.to_torch(list(model.layers))


def test_onnx_export_is_float32_and_refuses_float64():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    # Why dtype="float64" is refused: onnxruntime cannot run a float64 GRU node at all. If a
    # release adds the kernel, this fails, and to_onnx can export float64 instead.
    H, W, R = 2, np.ones((1, 6, 1)), np.ones((1, 6, 2))
    graph = helper.make_graph(
        [helper.make_node("GRU", ["x", "W", "R"], ["Y"], hidden_size=H)], "double_gru",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 1, 1])],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, [1, 1, 1, H])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(proto)
    with pytest.raises(Exception, match="GRU operator does not support double"):
        ort.InferenceSession(proto.SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"x": np.ones((1, 1, 1))})

    model = _model("gates", np.float64)
    for dtype in ("float64", np.float64):
        with pytest.raises(ValueError, match=r"^dtype: expected 'float32', got .*float64.*; "
                                             r"onnxruntime's GRU operator has no float64 kernel"):
            converters.to_onnx(model, dtype=dtype)
    with pytest.raises(ValueError, match=r"^dtype: expected 'float32', got 'int8'"):
        converters.to_onnx(model, dtype="int8")
    # The default rounds the float64 weights to float32 (documented); the graph runs them.
    proto = converters.to_onnx(model)
    assert {t.data_type for t in proto.graph.initializer} == {TensorProto.FLOAT, TensorProto.INT64}
    xs, state0 = _inputs(model)
    _close(_run_steps(_ort_forward(proto), xs, state0), _oracle_steps(model, xs, state0), atol=1e-5)
    # A weight float32 cannot hold is refused, naming it, rather than exported as inf.
    big = GRUModel([*model.layers[:2], DenseLayer(5, 1, np.full((1, 5), 1e300))])
    with pytest.raises(ValueError, match=r"^layers\[2\]\.W: expected values within float32's "
                                         r"range"):
        converters.to_onnx(big)


def test_exporters_refuse_a_layer_kind_they_do_not_map():
    pytest.importorskip("onnx")
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    model = GRUModel([GRULayer(2, 3, rng.normal(size=(9, 2)), rng.normal(size=(9, 3)),
                               linear_before_reset=1), Accumulator(3, np.ones(3))])
    for export in (converters.to_onnx, converters.to_torch):
        with pytest.raises(UnsupportedModelError,
                           match=rf"^model: layers\[1\] is a 'accumulator' layer, which "
                                 rf"{export.__name__} does not export \(it maps 'gru', 'dense', "
                                 rf"'lstm'\)"):
            export(model)


# --------------------------------------------------------------------------------------------
# LSTM layers (the engine does not run them yet: the float64 oracle is the reference)


def _lstm_model(proj, dtype=np.float32):
    """proj=False: Dense -> LSTM (peepholes, clip, input_forget, an activation away from the
    default in each of f, g, h) -> GRU -> LSTM (torch-native) -> Dense. proj=True: an LSTM
    with a projection (torch-native), one with a projection and clip, and a Dense head."""
    rng = np.random.default_rng(7)
    if proj:
        layers = [LSTMSpec.random(3, 5, 1, proj_size=2).layer(dtype),
                  LSTMSpec.random(2, 4, 2, proj_size=3, clip=0.8).layer(dtype),
                  DenseLayer(3, 1, rng.uniform(-0.6, 0.6, (1, 3)).astype(dtype))]
    else:
        layers = [DenseLayer(3, 4, rng.uniform(-0.6, 0.6, (4, 3)).astype(dtype), activation="tanh"),
                  LSTMSpec.random(4, 5, 3, peepholes=True, clip=2.0, input_forget=1,
                                  f=("hardsigmoid", 0.3, 0.45), g=("leakyrelu", 0.2, 0.0),
                                  h=("scaledtanh", 0.9, 1.1)).layer(dtype),
                  GRULayer(5, 3, rng.uniform(-0.6, 0.6, (9, 5)).astype(dtype),
                           rng.uniform(-0.6, 0.6, (9, 3)).astype(dtype), linear_before_reset=0),
                  LSTMSpec.random(3, 4, 4).layer(dtype),
                  DenseLayer(4, 2, rng.uniform(-0.6, 0.6, (2, 4)).astype(dtype))]
    return GRUModel(layers)


def test_onnx_export_of_lstm_layers_runs_in_onnxruntime_as_the_oracle():
    pytest.importorskip("onnx")
    model = _lstm_model(proj=False)
    xs, state0 = _inputs(model)
    proto = converters.to_onnx(model)
    assert [n.op_type for n in proto.graph.node].count("LSTM") == 2
    _close(_run_steps(_ort_forward(proto), xs, state0), _oracle_steps(model, xs, state0),
           atol=1e-5)
    ys, state = _ort_forward(converters.to_onnx(model, sequence=True))(xs, state0)
    ref = _oracle_steps(model, xs, state0)
    np.testing.assert_allclose(ys, np.stack([y for y, _ in ref]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(state, ref[-1][1], atol=1e-5, rtol=0)


def test_onnx_export_refuses_an_lstm_projection_with_the_reason():
    pytest.importorskip("onnx")
    with pytest.raises(UnsupportedModelError, match=r"^model: layers\[0\] is an LSTM layer with "
                                                    r"proj_size=2, which to_onnx does not export: "
                                                    r"ONNX's LSTM operator has no projection"):
        converters.to_onnx(_lstm_model(proj=True))


@pytest.mark.parametrize("proj", [False, True], ids=["lstm", "proj"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_export_of_lstm_layers_runs_as_the_oracle(proj, dtype):
    pytest.importorskip("torch")
    model = _lstm_model(proj, np.dtype(dtype))
    net = converters.to_torch(model)
    # Torch's own modules where torch runs the layer, the canonical equations elsewhere.
    native = [type(m.cell or m.lstm).__name__ for m in net.layers
              if hasattr(m, "cell") and (m.cell or m.lstm) is not None]
    assert native == (["LSTM"] if proj else ["LSTMCell"])
    # and torch's importer reads the native module back to the same canonical layer
    module = next(m.cell or m.lstm for m in net.layers
                  if hasattr(m, "cell") and (m.cell or m.lstm) is not None)
    back = converters.from_torch(module).layers[0]
    want = model.layers[0 if proj else 3]
    assert back.config() == want.config()
    for name, t in want.tensors().items():
        np.testing.assert_array_equal(back.tensors()[name], t)
    xs, state0 = _inputs(model)
    forward = _torch_step(net, dtype)

    got = _run_steps(forward, xs, state0)
    assert got[0][0].dtype == np.dtype(dtype)
    _close(got, _oracle_steps(model, xs, state0), atol={"float32": 1e-5, "float64": 1e-12}[dtype])
