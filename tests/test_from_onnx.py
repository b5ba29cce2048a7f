"""converters.from_onnx against onnxruntime: torch exports (both exporters), hand-built
tf2onnx-style graphs, every GRU attribute, and every refusal.

The reference is always onnxruntime running the ONNX file over the whole sequence, with a
non-zero initial state fed as a graph input where the graph takes one; streamgru's side is the
float64 oracle stepping several interleaved streams one step at a time (and the Engine in both
dtypes once it exists). onnxruntime has no float64 GRU kernel, so comparisons use float32
tolerances (1e-5) against it.
"""

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import oracle  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from converters.from_onnx import from_onnx  # noqa: E402
from streamgru.errors import UnsupportedModelError  # noqa: E402

F = TensorProto.FLOAT
RNG = np.random.default_rng(1234)


def ort_run(proto, feeds):
    data = proto if isinstance(proto, bytes) else proto.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def stream_outputs(model, xs, states, *, engine=True, final=False):
    """Step streams one at a time in a shuffled, interleaved order through the oracle, and (with
    ``engine``) check the Engine in both dtypes against it, two groups of streams per step.

    xs: (n_streams, T, I), states: (n_streams, state_size) -> ys (n_streams, T, O), and the
    oracle's final states (n_streams, state_size) with ``final``."""
    n, T = xs.shape[:2]
    st = np.array(states, np.float64)
    ys = np.zeros((n, T, model.output_size))
    order = np.random.default_rng(0)
    for t in range(T):
        for s in order.permutation(n):
            y, new = oracle.step(model, st[s:s + 1], xs[s, t:t + 1])
            ys[s, t], st[s] = y[0], new[0]
    import streamgru

    for dt, tol in (("float32", 1e-5), ("float64", 1e-9)) if engine else ():
        eng = streamgru.Engine(model, dtype=dt)
        for s in range(n):
            eng.open(f"s{s}", state=states[s].astype(dt))
        for t in range(T):
            for group in np.array_split(order.permutation(n), 2):
                if len(group):
                    out = eng.step([f"s{s}" for s in group], xs[group, t].astype(dt))
                    np.testing.assert_allclose(out, ys[group, t], rtol=tol, atol=tol)
    return (ys, st) if final else ys


def tensor(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def make(nodes, inputs, outputs, inits, opset=14):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def vi(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


# --------------------------------------------------------------------------- torch exports

def _torch_model(num_layers, batch_first, last_only=False):
    torch = pytest.importorskip("torch")
    torch.manual_seed(num_layers * 10 + batch_first)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(3, 6)
            self.gru = torch.nn.GRU(6, 5, num_layers=num_layers, batch_first=batch_first)
            self.out = torch.nn.Linear(5, 2)

        def forward(self, x, h):
            y, hn = self.gru(torch.tanh(self.inp(x)), h)
            if last_only:
                y = y[:, -1] if batch_first else y[-1]
            return self.out(y), hn

    return torch, Net().eval()


def _export(torch, net, args, path, dynamo, input_names=("x", "h"), output_names=("y", "hn"),
            **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(net, args, str(path), dynamo=dynamo, input_names=list(input_names),
                              output_names=list(output_names), **kw)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_torch_export_matches_onnxruntime(tmp_path, dynamo, num_layers):
    if dynamo:
        pytest.importorskip("onnxscript")
    torch, net = _torch_model(num_layers, batch_first=True)
    B, T = 3, 6
    x = torch.randn(B, T, 3)
    h = torch.randn(num_layers, B, 5) * 0.5
    path = tmp_path / "m.onnx"
    _export(torch, net, (x, h), path, dynamo)
    model = from_onnx(path)
    kinds = [layer.kind for layer in model.layers]
    assert kinds == ["dense"] + ["gru"] * num_layers + ["dense"]
    assert all(g.linear_before_reset == 1 for g in model.gru_layers)
    y_ort, hn_ort = ort_run(onnx.load(str(path)), {"x": x.numpy(), "h": h.numpy()})
    # Our state is the layers' hidden vectors concatenated: h (L, B, H) -> (B, L*H).
    states = h.numpy().transpose(1, 0, 2).reshape(B, -1)
    ys = stream_outputs(model, x.numpy().astype(np.float64), states)
    np.testing.assert_allclose(ys, y_ort, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y_t, _ = net(x, h)
    np.testing.assert_allclose(ys, y_t.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_dynamo_unoptimized_constant_folds_weights(tmp_path):
    """optimize=False keeps W/R rebuilt from torch-order tensors through Slice/Concat."""
    pytest.importorskip("onnxscript")
    torch, net = _torch_model(2, batch_first=False)
    x = torch.randn(5, 2, 3)
    h = torch.randn(2, 2, 5) * 0.5
    path = tmp_path / "m.onnx"
    _export(torch, net, (x, h), path, True, optimize=False)
    proto = onnx.load(str(path))
    gru_w = [n.input[1] for n in proto.graph.node if n.op_type == "GRU"]
    assert not set(gru_w) & {i.name for i in proto.graph.initializer}  # really rebuilt
    model = from_onnx(proto)
    y_ort, _ = ort_run(proto, {"x": x.numpy(), "h": h.numpy()})
    states = h.numpy().transpose(1, 0, 2).reshape(2, -1)
    ys = stream_outputs(model, x.numpy().transpose(1, 0, 2).astype(np.float64), states)
    np.testing.assert_allclose(ys, y_ort.transpose(1, 0, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_torch_last_step_head_dynamic_axes(tmp_path, dynamo):
    """fc(y[:, -1]) with dynamic batch/time: the graph's output is ours at the final step."""
    if dynamo:
        pytest.importorskip("onnxscript")
    torch, net = _torch_model(2, batch_first=True, last_only=True)
    x = torch.randn(2, 7, 3)
    h = torch.randn(2, 2, 5) * 0.5
    path = tmp_path / "m.onnx"
    if dynamo:
        d = {0: torch.export.Dim("b"), 1: torch.export.Dim("t")}
        _export(torch, net, (x, h), path, True, dynamic_shapes=(d, {1: torch.export.Dim("b")}))
    else:
        _export(torch, net, (x, h), path, False,
                dynamic_axes={"x": {0: "b", 1: "t"}, "h": {1: "b"}})
    model = from_onnx(path)
    # Another batch size than at export (and another length where the exporter keeps it
    # dynamic: the dynamo exporter specialises the GRU's time axis).
    x2 = torch.randn(3, 7 if dynamo else 4, 3)
    h2 = torch.randn(2, 3, 5) * 0.5
    y_ort, _ = ort_run(onnx.load(str(path)), {"x": x2.numpy(), "h": h2.numpy()})
    ys = stream_outputs(model, x2.numpy().astype(np.float64),
                        h2.numpy().transpose(1, 0, 2).reshape(3, -1))
    np.testing.assert_allclose(ys[:, -1], y_ort, rtol=1e-5, atol=1e-5)


def test_grucell_export_is_refused_with_advice(tmp_path):
    torch = pytest.importorskip("torch")
    cell = torch.nn.GRUCell(3, 4)
    path = tmp_path / "cell.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(cell, (torch.randn(1, 3), torch.randn(1, 4)), str(path), dynamo=False)
    with pytest.raises(UnsupportedModelError, match=r"no GRU or LSTM node.*nn\.GRU"):
        from_onnx(path)


# --------------------------------------------------------------------------- hand-built graphs

def gru_weights(I, H, scale=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-scale, scale, (1, 3 * H, I)), rng.uniform(-scale, scale, (1, 3 * H, H)),
            rng.uniform(-scale, scale, (1, 6 * H)))


def single_gru(I=3, H=4, *, h0_input=True, layout=0, B=True, **attrs):
    W, R, Bv = gru_weights(I, H)
    ins = ["X", "W", "R", "B" if B else "", "", "h0" if h0_input else ""]
    node = helper.make_node("GRU", ins, ["Y", "Y_h"], name="gru", hidden_size=H, layout=layout,
                            **attrs)
    inputs = [vi("X", ["T", "N", I] if layout == 0 else ["N", "T", I])]
    if h0_input:
        inputs.append(vi("h0", [1, "N", H] if layout == 0 else ["N", 1, H]))
    inits = [tensor("W", W), tensor("R", R)] + ([tensor("B", Bv)] if B else [])
    return make([node], inputs, [vi("Y_h", None)], inits)


def check_single(proto, n=3, T=5, I=3, H=4, x_scale=1.0):
    """Compare Y_h of onnxruntime (layout 0 graph with an h0 input) with the oracle streams."""
    model = from_onnx(proto)
    x = (RNG.normal(size=(n, T, I)) * x_scale).astype(np.float32)
    h0 = (RNG.normal(size=(n, H)) * 0.5).astype(np.float32)
    (yh,) = ort_run(proto, {"X": x.transpose(1, 0, 2), "h0": h0[None]})
    ys = stream_outputs(model, x.astype(np.float64), h0)
    np.testing.assert_allclose(ys[:, -1], yh[0], rtol=1e-5, atol=1e-5)
    return model


@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_single_gru_lbr_and_bias(lbr, with_bias):
    model = check_single(single_gru(linear_before_reset=lbr, B=with_bias))
    assert model.layers[0].linear_before_reset == lbr


ACT_CASES = [
    (["Relu", "Tanh"], [], []),
    (["Sigmoid", "Relu"], [], []),
    (["Tanh", "Sigmoid"], [], []),
    (["HardSigmoid", "Tanh"], [0.3], [0.4]),
    (["HardSigmoid", "Tanh"], [], []),
    (["LeakyRelu", "Tanh"], [0.2], []),
    (["Sigmoid", "LeakyRelu"], [], []),
    (["Elu", "Tanh"], [0.5], []),
    (["Sigmoid", "Elu"], [], []),
    (["ThresholdedRelu", "Tanh"], [0.1], []),
    (["Sigmoid", "ThresholdedRelu"], [], []),  # onnxruntime's default alpha is 0
    (["Sigmoid", "ScaledTanh"], [0.7], [1.3]),
    (["Affine", "Tanh"], [0.5], [0.1]),
    (["Sigmoid", "Affine"], [], [0.2]),  # alpha defaults to 0 in onnxruntime
    (["Softsign", "Softplus"], [], []),
    (["LeakyRelu", "ScaledTanh"], [0.1, 0.7], [1.3]),  # lists consumed per activation in order
    (["HardSigmoid", "Affine"], [0.3, 0.5], [0.4, 0.2]),
]


@pytest.mark.parametrize("acts,alpha,beta", ACT_CASES, ids=["-".join(c[0]) for c in ACT_CASES])
@pytest.mark.parametrize("lbr", [0, 1])
def test_activations_match_onnxruntime(acts, alpha, beta, lbr):
    attrs = {"activations": acts, "linear_before_reset": lbr}
    if alpha:
        attrs["activation_alpha"] = alpha
    if beta:
        attrs["activation_beta"] = beta
    model = check_single(single_gru(**attrs), x_scale=0.5)
    assert model.layers[0].f[0] == acts[0].lower() and model.layers[0].g[0] == acts[1].lower()


@pytest.mark.parametrize("lbr", [0, 1])
def test_clip_matches_onnxruntime(lbr):
    model = check_single(single_gru(clip=0.3, linear_before_reset=lbr), x_scale=3.0)
    assert model.layers[0].clip == pytest.approx(0.3)


def test_layout_1_matches_reference_and_layout0_twin():
    """onnxruntime refuses layout=1, so its reference is the same node with layout=0 between
    Transposes; ONNX's ReferenceEvaluator runs the layout=1 graph itself."""
    from onnx.reference import ReferenceEvaluator

    proto1 = single_gru(layout=1, linear_before_reset=1)
    model = from_onnx(proto1)
    x = RNG.normal(size=(3, 5, 3)).astype(np.float32)
    h0 = (RNG.normal(size=(3, 4)) * 0.5).astype(np.float32)
    (yh_ref,) = ReferenceEvaluator(proto1).run(None, {"X": x, "h0": h0[:, None]})
    (yh_ort,) = ort_run(single_gru(layout=0, linear_before_reset=1),
                        {"X": x.transpose(1, 0, 2), "h0": h0[None]})
    ys = stream_outputs(model, x.astype(np.float64), h0)
    np.testing.assert_allclose(ys[:, -1], yh_ref[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ys[:, -1], yh_ort[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lbr", [0, 1])
def test_tf2onnx_style_keras_graph(lbr):
    """Keras GRU through tf2onnx: Transpose -> GRU -> Squeeze -> Transpose -> MatMul/Add ->
    Softmax, zero initial_h from ConstantOfShape of the dynamic batch."""
    I, H, O = 4, 5, 3
    W, R, Bv = gru_weights(I, H, seed=3)
    K = RNG.normal(size=(H, O))
    c = RNG.normal(size=(O,))
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="tr_in"),
        helper.make_node("Shape", ["x"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "one"], ["bsz"], axis=0, name="gather_b"),
        helper.make_node("Concat", ["one_v", "bsz", "H_v"], ["h0shape"], axis=0, name="cat"),
        helper.make_node("ConstantOfShape", ["h0shape"], ["h0"], name="zeros",
                         value=helper.make_tensor("v", F, [1], [0.0])),
        helper.make_node("GRU", ["xt", "W", "R", "B", "", "h0"], ["Y", ""], hidden_size=H,
                         linear_before_reset=lbr, name="keras_gru"),
        helper.make_node("Squeeze", ["Y", "ax1"], ["Ys"], name="sq"),
        helper.make_node("Transpose", ["Ys"], ["Yb"], perm=[1, 0, 2], name="tr_out"),
        helper.make_node("MatMul", ["Yb", "K"], ["mm"], name="dense/MatMul"),
        helper.make_node("Add", ["mm", "c"], ["logits"], name="dense/BiasAdd"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="dense/Softmax"),
    ]
    inits = [tensor("W", W), tensor("R", R), tensor("B", Bv), tensor("K", K), tensor("c", c),
             helper.make_tensor("one", i64, [1], [0]), helper.make_tensor("one_v", i64, [1], [1]),
             helper.make_tensor("H_v", i64, [1], [H]), helper.make_tensor("ax1", i64, [1], [1])]
    proto = make(nodes, [vi("x", ["N", "T", I])], [vi("probs", None)], inits)
    model = from_onnx(proto)
    assert [la.kind for la in model.layers] == ["gru", "dense"]
    assert model.layers[1].activation[0] == "softmax"
    x = RNG.normal(size=(3, 6, I)).astype(np.float32)
    (probs,) = ort_run(proto, {"x": x})
    ys = stream_outputs(model, x.astype(np.float64), np.zeros((3, H)))
    np.testing.assert_allclose(ys, probs, rtol=1e-5, atol=1e-5)


DENSE_ACTS = [("Relu", {}), ("Tanh", {}), ("Sigmoid", {}), ("LeakyRelu", {"alpha": 0.2}),
              ("Elu", {"alpha": 0.7}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
              ("Softsign", {}), ("Softplus", {}), ("ThresholdedRelu", {"alpha": 0.1}),
              ("Softmax", {"axis": 1})]


@pytest.mark.parametrize("act,attrs", DENSE_ACTS, ids=[a for a, _ in DENSE_ACTS])
def test_gemm_dense_before_and_after(act, attrs):
    """Gemm (transB, alpha, beta) on 2-D tensors: (N, I) -> Unsqueeze -> GRU -> Y_h path."""
    I, M, H, O = 3, 4, 5, 2
    W, R, Bv = gru_weights(M, H, seed=4)
    A = RNG.normal(size=(M, I))  # transB=1: stored (out, in)
    a_bias = RNG.normal(size=(1, M))
    Bm = RNG.normal(size=(H, O))  # transB=0: stored (in, out)
    b2 = RNG.normal(size=(O,))
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("Gemm", ["x", "A", "ab"], ["d1"], transB=1, alpha=0.7, beta=1.5,
                         name="gemm_in"),
        helper.make_node(act, ["d1"], ["a1"], name="act_in", **attrs),
        helper.make_node("Unsqueeze", ["a1", "ax0"], ["seq"], name="unsq"),
        helper.make_node("GRU", ["seq", "W", "R", "B", "", "h0"], ["", "Y_h"], hidden_size=H,
                         linear_before_reset=1, name="gru"),
        helper.make_node("Squeeze", ["Y_h", "ax0"], ["h"], name="sq"),
        helper.make_node("Gemm", ["h", "Bm", "b2"], ["out"], alpha=1.3, beta=0.5,
                         name="gemm_out"),
        helper.make_node("LeakyRelu", ["out"], ["y"], alpha=0.05, name="act_out"),
    ]
    inits = [tensor("W", W), tensor("R", R), tensor("B", Bv), tensor("A", A),
             tensor("ab", a_bias), tensor("Bm", Bm), tensor("b2", b2),
             helper.make_tensor("ax0", i64, [1], [0])]
    proto = make(nodes, [vi("x", ["N", I]), vi("h0", [1, "N", H])], [vi("y", None)], inits)
    model = from_onnx(proto)
    assert [la.kind for la in model.layers] == ["dense", "gru", "dense"]
    # One step per call: the graph takes a single step of every stream.
    n, T = 3, 4
    xs = RNG.normal(size=(n, T, I)).astype(np.float32)
    h = (RNG.normal(size=(n, H)) * 0.5).astype(np.float32)
    ys = stream_outputs(model, xs.astype(np.float64), h)
    for t in range(T):  # feed ORT its own state back, step by step
        (y,) = ort_run(proto, {"x": xs[:, t], "h0": h[None]})
        np.testing.assert_allclose(ys[:, t], y, rtol=1e-5, atol=1e-5)
        h = oracle.step(model, h, xs[:, t])[1].astype(np.float32)


def test_dtype_argument_and_zero_initial_h_constant():
    proto = single_gru(h0_input=False)
    node = proto.graph.node[0]
    node.input[5] = "h0c"
    proto.graph.initializer.append(tensor("h0c", np.zeros((1, 1, 4))))
    m64 = from_onnx(proto, dtype="float64")
    assert m64.dtype == np.float64
    assert from_onnx(proto).dtype == np.float32
    with pytest.raises(ValueError, match="dtype: expected"):
        from_onnx(proto, dtype="int32")


def test_external_data_inside_model_dir(tmp_path):
    proto = single_gru()
    onnx.save_model(proto, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    model = from_onnx(tmp_path / "m.onnx")
    assert model.layers[0].hidden_size == 4
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(UnsupportedModelError, match="pass the .onnx path"):
        from_onnx(loaded)


@pytest.mark.parametrize("location", ["/etc/passwd", "../weights.bin", "sub/../../w.bin"])
def test_external_data_outside_model_dir_is_refused(tmp_path, location):
    proto = single_gru()
    onnx.save_model(proto, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    d = tmp_path / "evil"
    d.mkdir()
    onnx.save_model(m, str(d / "m.onnx"))
    with pytest.raises(UnsupportedModelError, match="refusing to read outside"):
        from_onnx(d / "m.onnx")


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
def test_direction_refused(direction):
    proto = single_gru(direction=direction, h0_input=False)
    if direction == "bidirectional":
        W, R, Bv = gru_weights(3, 4)
        proto.graph.ClearField("initializer")
        proto.graph.initializer.extend([tensor("W", np.concatenate([W, W])),
                                        tensor("R", np.concatenate([R, R])),
                                        tensor("B", np.concatenate([Bv, Bv]))])
    with pytest.raises(UnsupportedModelError, match=rf"'gru'.*direction='{direction}'.*future"):
        from_onnx(proto)


def test_sequence_lens_refused():
    proto = single_gru(h0_input=False)
    proto.graph.node[0].input[4] = "lens"
    proto.graph.input.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["N"]))
    with pytest.raises(UnsupportedModelError, match="'gru'.*sequence_lens is not supported"):
        from_onnx(proto)


def test_nonzero_constant_initial_h_refused():
    proto = single_gru(h0_input=False)
    proto.graph.node[0].input[5] = "h0c"
    proto.graph.initializer.append(tensor("h0c", np.full((1, 1, 4), 0.5)))
    with pytest.raises(UnsupportedModelError, match="non-zero constant.*engine.open"):
        from_onnx(proto)


def test_unknown_attribute_refused():
    proto = single_gru()
    proto.graph.node[0].attribute.append(helper.make_attribute("peephole", 1))
    with pytest.raises(UnsupportedModelError, match="'peephole' is not implemented"):
        from_onnx(proto)


def test_unconsumed_activation_alpha_refused():
    proto = single_gru(activations=["Sigmoid", "Tanh"], activation_alpha=[0.3])
    with pytest.raises(UnsupportedModelError, match="no activation .* consumes"):
        from_onnx(proto)


def test_unknown_activation_refused():
    proto = single_gru(activations=["Sigmoid", "Gelu"])
    with pytest.raises(UnsupportedModelError, match="'Gelu' is not an ONNX RNN activation"):
        from_onnx(proto)


def _two_parallel_grus():
    W, R, Bv = gru_weights(3, 4)
    W2, R2, B2 = gru_weights(3, 6, seed=9)
    nodes = [helper.make_node("GRU", ["X", "W", "R", "B"], ["", "h1"], hidden_size=4,
                              name="left"),
             helper.make_node("GRU", ["X", "W2", "R2", "B2"], ["", "h2"], hidden_size=6,
                              name="right")]
    inits = [tensor("W", W), tensor("R", R), tensor("B", Bv), tensor("W2", W2),
             tensor("R2", R2), tensor("B2", B2)]
    return make(nodes, [vi("X", ["T", "N", 3])], [vi("h1", None), vi("h2", None)], inits)


def test_several_grus_not_a_chain():
    proto = _two_parallel_grus()
    with pytest.raises(UnsupportedModelError,
                       match=r"recurrent nodes: 'left' \(GRU, input_size=3, hidden_size=4\), "
                             r"'right' \(GRU, input_size=3, hidden_size=6\).*node="):
        from_onnx(proto)
    right = from_onnx(proto, node="right")
    assert len(right.layers) == 1 and right.layers[0].hidden_size == 6
    x = RNG.normal(size=(5, 2, 3)).astype(np.float32)
    _, h2 = ort_run(proto, {"X": x})
    ys = stream_outputs(right, x.transpose(1, 0, 2).astype(np.float64), np.zeros((2, 6)))
    np.testing.assert_allclose(ys[:, -1], h2[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedModelError,
                       match="node: expected the name of a GRU or LSTM node"):
        from_onnx(proto, node="middle")


def test_value_changing_op_on_path_refused():
    proto = single_gru(h0_input=False)
    proto.graph.node.insert(0, helper.make_node("Abs", ["X"], ["Xa"], name="abs"))
    proto.graph.node[1].input[0] = "Xa"
    with pytest.raises(UnsupportedModelError, match=r"'abs' \(Abs\): this op changes values"):
        from_onnx(proto)


def test_transpose_moving_features_refused():
    proto = single_gru(h0_input=False)
    proto.graph.node.insert(0, helper.make_node("Transpose", ["X"], ["Xt"], perm=[0, 2, 1],
                                                name="bad_tr"))
    proto.graph.node[1].input[0] = "Xt"
    with pytest.raises(UnsupportedModelError, match="'bad_tr'.*moves the feature"):
        from_onnx(proto)


def test_feature_slice_refused():
    proto = single_gru(h0_input=False)
    i64 = TensorProto.INT64
    proto.graph.node.insert(0, helper.make_node("Slice", ["X", "s", "e", "a"], ["Xs"],
                                                name="cut"))
    proto.graph.node[1].input[0] = "Xs"
    proto.graph.initializer.extend([helper.make_tensor("s", i64, [1], [0]),
                                    helper.make_tensor("e", i64, [1], [2]),
                                    helper.make_tensor("a", i64, [1], [2])])
    with pytest.raises(UnsupportedModelError, match="'cut'.*slices axis 2"):
        from_onnx(proto)


def test_extra_non_state_output_refused():
    proto = single_gru(h0_input=False)
    proto.graph.node.append(helper.make_node("Relu", ["X"], ["Yr"], name="relu"))
    proto.graph.output.append(vi("Yr", None))
    # Y_h is a hidden state, Yr is not: the GRU is off the path to the one real output.
    with pytest.raises(UnsupportedModelError, match=r"'gru' \(GRU\) feed the graph outputs"):
        from_onnx(proto)
    proto.graph.output.append(vi("Y", None))
    with pytest.raises(UnsupportedModelError, match=r"exactly one output.*\['Yr', 'Y'\]"):
        from_onnx(proto)


def test_loop_graph_refused_with_advice():
    body = helper.make_graph([helper.make_node("Identity", ["c"], ["c_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])])
    loop = helper.make_node("Loop", ["M", "cond"], [], body=body, name="while")
    proto = make([loop], [vi("X", [1])], [vi("X", None)],
                 [helper.make_tensor("M", TensorProto.INT64, [], [1]),
                  helper.make_tensor("cond", TensorProto.BOOL, [], [True])])
    with pytest.raises(UnsupportedModelError, match="no GRU or LSTM node.*Loop x1.*from_keras"):
        from_onnx(proto)


def test_bad_arguments():
    with pytest.raises(TypeError, match="path_or_model: expected a path or an onnx.ModelProto"):
        from_onnx(42)
    with pytest.raises(FileNotFoundError, match="path_or_model"):
        from_onnx("/nonexistent/model.onnx")
