"""converters.from_onnx on ONNX ``LSTM`` nodes, against onnxruntime running each graph.

Graphs come from torch's two exporters (``nn.LSTM`` 1-2 layers, ``batch_first``, ``bias=False``,
Linear heads, with and without an ``(h0, c0)`` input, a module mixing GRU and LSTM, a streaming
graph whose states live in a cache tensor) and are built here with ``onnx.helper`` (peepholes,
``input_forget``, ``clip``, activations with alpha/beta, ``layout=1``, chains of Dense, LSTM and
GRU layers, and one graph per refusal).

The engine does not run LSTM layers yet, so the converted model is stepped by the float64
oracle (``tests/oracle.py``, itself checked against onnxruntime's LSTM in test_oracle.py) as
the engine's stand-in. :func:`check_streams` is the one comparison of this file: several
streams from a nonzero state (h and C), stepped interleaved one step per call
(``test_from_onnx.stream_outputs``), every step compared with onnxruntime at the GRU tests'
float32 tolerance (onnxruntime has no float64 LSTM kernel). It also runs the Engine in both
dtypes, through the same function, as soon as the engine runs every layer of the model
(``Layer.runnable``).
"""

import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402
from test_export_matrix import STEPS, B, H, I, _export, _rnn  # noqa: E402
from test_from_onnx import _export as export_module  # noqa: E402
from test_from_onnx import make, ort_run, stream_outputs, tensor, vi  # noqa: E402

import converters  # noqa: E402
from converters.from_onnx import from_onnx, io_signature  # noqa: E402
from streamgru.cli import main as cli_main  # noqa: E402
from streamgru.errors import UnsupportedModelError  # noqa: E402

nn = torch.nn
TOL = 1e-5  # float32, as the GRU tests against onnxruntime


def check_streams(model, xs, states, want, final=None):
    """``model`` stepped as streams against onnxruntime: every step's output, and the final
    states when ``final`` is given.

    xs (n, T, input_size) and states (n, state_size): each stream's inputs and start state;
    want (n, T, output_size) and final (n, state_size): what onnxruntime computed from them.
    The streams are stepped by the float64 oracle, and by the Engine in float32 and float64
    once it runs every layer of the model.
    """
    engine = all(layer.runnable for layer in model.layers)
    ys, last = stream_outputs(model, np.asarray(xs, np.float64), np.asarray(states, np.float64),
                              engine=engine, final=True)
    np.testing.assert_allclose(ys, want, rtol=TOL, atol=TOL)
    if final is not None:
        np.testing.assert_allclose(last, final, rtol=TOL, atol=TOL)
    assert np.abs(ys - ys[:, :1]).max() > 1e-3  # the outputs move: a frozen stream would fail


# --------------------------------------------------------------------------- hand-built nodes

def lstm_tensors(I, H, seed, scale=0.5):
    """W (1, 4H, I), R (1, 4H, H), B (1, 8H), P (1, 3H) in ONNX's layout, uniform(-scale, scale)."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(-scale, scale, (1, 4 * H, I)), rng.uniform(-scale, scale, (1, 4 * H, H)),
            rng.uniform(-scale, scale, (1, 8 * H)), rng.uniform(-1, 1, (1, 3 * H)))


def single_lstm(I=3, H=4, *, seed=0, bias=True, P=False, states=True, layout=0, scale=0.5,
                outputs=("Y", "Y_h", "Y_c"), **attrs):
    """One LSTM node named 'lstm': X, and with ``states`` the graph inputs h0 and c0."""
    W, R, Bv, Pv = lstm_tensors(I, H, seed, scale)
    ins = ["X", "W", "R", "B" if bias else "", "", "h0" if states else "",
           "c0" if states else "", "P" if P else ""]
    while not ins[-1]:
        ins.pop()
    node = helper.make_node("LSTM", ins, ["Y", "Y_h", "Y_c"], name="lstm", hidden_size=H,
                            layout=layout, **attrs)
    lead = ["T", "N"] if layout == 0 else ["N", "T"]
    inputs = [vi("X", lead + [I])]
    if states:
        inputs += [vi(n, [1, "N", H] if layout == 0 else ["N", 1, H]) for n in ("h0", "c0")]
    inits = [tensor("W", W), tensor("R", R)] + [tensor("B", Bv)] * bias + [tensor("P", Pv)] * P
    return make([node], inputs, [vi(o, None) for o in outputs], inits)


def stream_inputs(n, T, I, H, seed, x_scale=1.0, c_scale=1.0):
    """float32 xs (n, T, I), h0 (n, H), c0 (n, H): nonzero, seeded."""
    rng = np.random.default_rng(seed)
    return ((rng.normal(size=(n, T, I)) * x_scale).astype(np.float32),
            (rng.normal(size=(n, H)) * 0.5).astype(np.float32),
            (rng.normal(size=(n, H)) * c_scale).astype(np.float32))


def check_single(proto, I=3, H=4, seed=0, x_scale=1.0, c_scale=1.0):
    """A layout-0 :func:`single_lstm` graph: from_onnx against onnxruntime's Y at every step
    and its Y_h, Y_c as the final state, 3 streams x 6 steps from nonzero h0, c0."""
    model = from_onnx(proto)
    x, h0, c0 = stream_inputs(3, 6, I, H, seed, x_scale, c_scale)
    y, y_h, y_c = ort_run(proto, {"X": x.transpose(1, 0, 2), "h0": h0[None], "c0": c0[None]})
    check_streams(model, x, np.concatenate([h0, c0], axis=1), y[:, 0].transpose(1, 0, 2),
                  final=np.concatenate([y_h[0], y_c[0]], axis=1))
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_single_lstm(bias):
    model = check_single(single_lstm(bias=bias))
    (layer,) = model.layers
    assert layer.kind == "lstm" and layer.state_size == 8 and layer.P is None
    assert (layer.f, layer.g, layer.h) == (("sigmoid", 0.0, 0.0), ("tanh", 0.0, 0.0),
                                           ("tanh", 0.0, 0.0))
    assert any("its initial_h and initial_c come from graph input(s) ['c0', 'h0']: taken as the "
               "per-stream state (initial_h = elements 0:4, initial_c = elements 4:8" in n
               for n in model.notes), model.notes
    # Y is the output; Y_h and Y_c, also graph outputs, are states left to the engine.
    assert [n for n in model.notes if "only re-exposes recurrent states" in n] == [
        f"graph output {o!r} only re-exposes recurrent states (Y_h, Y_c): ignored, the engine "
        f"keeps each stream's state" for o in ("Y_h", "Y_c")]


def test_peepholes():
    """C0 large enough that the peephole terms move the gates."""
    model = check_single(single_lstm(P=True), c_scale=2.0)
    assert model.layers[0].P is not None


def test_input_forget():
    model = check_single(single_lstm(P=True, input_forget=1))
    assert model.layers[0].input_forget == 1


def test_clip():
    """Weights, inputs and C0 large enough that clip binds."""
    model = check_single(single_lstm(P=True, clip=0.7, scale=2.0), x_scale=2.0, c_scale=3.0)
    assert model.layers[0].clip == pytest.approx(0.7)


# (activations f, g, h; activation_alpha; activation_beta): onnxruntime reads each list in order,
# one value per activation that takes it, and defaults Affine, ScaledTanh and ThresholdedRelu to 0.
ACT_CASES = [
    (["HardSigmoid", "LeakyRelu", "ScaledTanh"], [0.3, 0.2, 0.8], [0.6, 1.5]),
    (["HardSigmoid", "Tanh", "Tanh"], [], []),  # HardSigmoid's defaults 0.2, 0.5
    (["Sigmoid", "Elu", "Softsign"], [0.5], []),
    (["Sigmoid", "Affine", "Softplus"], [0.7], [0.1]),
    (["Sigmoid", "Tanh", "Affine"], [], [0.3]),  # alpha 0 (onnxruntime's default): h(C) = 0.3
    (["Sigmoid", "ThresholdedRelu", "Relu"], [], []),  # alpha 0
    (["Sigmoid", "ScaledTanh", "LeakyRelu"], [0.9, 0.1], [1.2]),
]


@pytest.mark.parametrize("acts, alpha, beta", ACT_CASES, ids=["-".join(c[0]) for c in ACT_CASES])
def test_activations_with_alpha_beta(acts, alpha, beta):
    attrs = {"activations": acts}
    if alpha:
        attrs["activation_alpha"] = alpha
    if beta:
        attrs["activation_beta"] = beta
    model = check_single(single_lstm(P=True, clip=3.0, **attrs), x_scale=0.7)
    layer = model.layers[0]
    assert [layer.f[0], layer.g[0], layer.h[0]] == [a.lower() for a in acts]


def test_layout_1_matches_reference_and_layout0_twin():
    """onnxruntime refuses layout=1, so the reference is ONNX's ReferenceEvaluator on the
    layout=1 graph, and onnxruntime on the same node with layout=0."""
    from onnx.reference import ReferenceEvaluator

    proto1 = single_lstm(layout=1, P=True)
    model = from_onnx(proto1)
    x, h0, c0 = stream_inputs(3, 6, 3, 4, seed=5, c_scale=2.0)
    y1, y1_h, y1_c = ReferenceEvaluator(proto1).run(None, {"X": x, "h0": h0[:, None],
                                                           "c0": c0[:, None]})
    y0, _, _ = ort_run(single_lstm(layout=0, P=True),
                       {"X": x.transpose(1, 0, 2), "h0": h0[None], "c0": c0[None]})
    states = np.concatenate([h0, c0], axis=1)
    check_streams(model, x, states, y1[:, :, 0], final=np.concatenate([y1_h[:, 0], y1_c[:, 0]], 1))
    check_streams(model, x, states, y0[:, 0].transpose(1, 0, 2))


def test_layout_1_chain_keeps_batch_first():
    """Two layout=1 LSTMs: Y (N, T, 1, H) -> Squeeze(axis 2) -> X (N, T, H) of the next; the
    walker must read time and batch in layout 1's order to accept the Squeeze and the second
    node's X (a single node converts to the same layer whatever its layout)."""
    from onnx.reference import ReferenceEvaluator

    W1, R1, B1, _ = lstm_tensors(3, 4, seed=7)
    W2, R2, B2, P2 = lstm_tensors(4, 5, seed=8)
    nodes = [helper.make_node("LSTM", ["X", "W1", "R1", "B1", "", "h1", "c1"],
                              ["Y1", "Y1_h", "Y1_c"], name="first", hidden_size=4, layout=1),
             helper.make_node("Squeeze", ["Y1", "ax2"], ["y1"], name="sq"),
             helper.make_node("LSTM", ["y1", "W2", "R2", "B2", "", "h2", "c2", "P2"],
                              ["Y2", "Y2_h", "Y2_c"], name="second", hidden_size=5, layout=1)]
    inits = [tensor("W1", W1), tensor("R1", R1), tensor("B1", B1), tensor("W2", W2),
             tensor("R2", R2), tensor("B2", B2), tensor("P2", P2),
             helper.make_tensor("ax2", TensorProto.INT64, [1], [2])]
    inputs = [vi("X", ["N", "T", 3])] + [vi(k, ["N", 1, w]) for k, w in
                                          (("h1", 4), ("c1", 4), ("h2", 5), ("c2", 5))]
    proto = make(nodes, inputs, [vi(o, None) for o in ("Y2", "Y1_h", "Y1_c", "Y2_h", "Y2_c")],
                 inits)
    model = from_onnx(proto)
    assert [la.kind for la in model.layers] == ["lstm", "lstm"]
    sig = io_signature(proto)
    assert (sig["time_axis"], sig["batch_axis"], sig["out_time_axis"], sig["out_batch_axis"]) == \
        (1, 0, 1, 0)
    assert sig["states"] == [("h1", 1, 0, 4), ("c1", 1, 4, 4), ("h2", 1, 8, 5), ("c2", 1, 13, 5)]
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 6, 3)).astype(np.float32)
    s0 = {k: rng.normal(size=(3, 1, w)).astype(np.float32) for k, w in
          (("h1", 4), ("c1", 4), ("h2", 5), ("c2", 5))}
    y2, *finals = ReferenceEvaluator(proto).run(None, {"X": x, **s0})
    check_streams(model, x, np.concatenate([v[:, 0] for v in s0.values()], axis=1), y2[:, :, 0],
                  final=np.concatenate([f[:, 0] for f in finals], axis=1))


def test_zero_initial_states_and_the_last_step():
    """Zero initial_h and initial_c computed from the dynamic batch (Shape/Gather/Concat/
    ConstantOfShape, as tf2onnx writes them for a GRU), the graph returning Y_h only (the last
    step): onnxruntime on every prefix of the sequence gives every step."""
    Hs = 4
    i64 = TensorProto.INT64
    proto = single_lstm(states=False, outputs=("Y_h",), P=True)
    g = proto.graph
    g.node[0].input[5] = g.node[0].input[6] = "z"
    zeros = [
        helper.make_node("Shape", ["X"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "one"], ["bsz"], axis=0, name="batch"),
        helper.make_node("Concat", ["one", "bsz", "H_v"], ["zshape"], axis=0, name="cat"),
        helper.make_node("ConstantOfShape", ["zshape"], ["z"], name="zeros",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
    ]
    for k, n in enumerate(zeros):
        g.node.insert(k, n)
    g.initializer.extend([helper.make_tensor("one", i64, [1], [1]),
                          helper.make_tensor("H_v", i64, [1], [Hs])])
    model = from_onnx(proto)
    assert not [n for n in model.notes if "per-stream state" in n]  # the graph takes no state
    x, _, _ = stream_inputs(3, 5, 3, Hs, seed=6)
    want = np.stack([ort_run(proto, {"X": x[:, :t + 1].transpose(1, 0, 2)})[0][0]
                     for t in range(5)], axis=1)
    check_streams(model, x, np.zeros((3, 2 * Hs)), want)
    # A zero constant initial_c is accepted as well.
    g.node[len(zeros)].input[6] = "c_zero"
    g.initializer.append(tensor("c_zero", np.zeros((1, 1, Hs))))
    assert from_onnx(proto).layers[0].hidden_size == Hs


def test_state_outputs_are_noted():
    model = from_onnx(single_lstm(outputs=("Y",)))
    assert not [n for n in model.notes if "re-exposes" in n]
    proto = single_lstm()
    proto.graph.node.append(helper.make_node("Squeeze", ["Y_c", "ax0"], ["c_out"], name="sq"))
    proto.graph.initializer.append(helper.make_tensor("ax0", TensorProto.INT64, [1], [0]))
    proto.graph.output.append(vi("c_out", None))
    notes = from_onnx(proto).notes
    for out in ("Y_h", "Y_c", "c_out"):
        assert f"graph output {out!r} only re-exposes recurrent states (Y_h, Y_c): ignored, the " \
               f"engine keeps each stream's state" in notes, notes


def test_to_onnx_graph_reads_back_to_the_same_layers():
    """Our exporter's LSTM node (peepholes, input_forget, clip, an activation away from the
    default in each position) between Dense and GRU layers: from_onnx gives the layers back."""
    from helpers import LSTMSpec

    from streamgru import DenseLayer, GRULayer, Model

    rng = np.random.default_rng(2)
    model = Model([
        DenseLayer(3, 4, rng.uniform(-0.6, 0.6, (4, 3)), activation="tanh"),
        # Parameters float32 holds exactly: ONNX stores float attributes in float32.
        LSTMSpec.random(4, 5, 3, peepholes=True, clip=2.0, input_forget=1,
                        f=("hardsigmoid", 0.25, 0.5), g=("leakyrelu", 0.125, 0.0),
                        h=("scaledtanh", 0.75, 1.25)).layer(np.float32),
        GRULayer(5, 3, rng.uniform(-0.6, 0.6, (9, 5)), rng.uniform(-0.6, 0.6, (9, 3)),
                 linear_before_reset=1),
        LSTMSpec.random(3, 4, 4).layer(np.float32),
    ]).astype("float32")
    back = from_onnx(converters.to_onnx(model, sequence=True))
    assert [la.config() for la in back.layers] == [la.config() for la in model.layers]
    for got, want in zip(back.layers, model.layers, strict=True):
        for name, t in want.tensors().items():
            np.testing.assert_array_equal(got.tensors()[name], t, err_msg=name)
    assert any("initial_h and initial_c come from graph input(s) ['state']" in n and
               "initial_h = elements 13:17, initial_c = elements 17:21" in n for n in back.notes)


# --------------------------------------------------------------------------- chains

def test_chain_of_dense_lstm_gru_lstm_with_state_inputs():
    """x -> MatMul/Add/Relu -> LSTM (peepholes, input_forget, clip) -> GRU -> LSTM (other
    activations) -> MatMul/Add/Softmax; each layer's initial state a graph input, every state
    output a graph output (onnxruntime's final state)."""
    Ia, Ha, Hg, Hb, O = 3, 4, 5, 3, 2
    rng = np.random.default_rng(11)
    Wa, Ra, Ba, Pa = lstm_tensors(4, Ha, seed=1)
    Wb, Rb, Bb, _ = lstm_tensors(Hg, Hb, seed=2)
    Wg, Rg, Bg = (rng.uniform(-0.5, 0.5, s) for s in ((1, 3 * Hg, Ha), (1, 3 * Hg, Hg),
                                                      (1, 6 * Hg)))
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("MatMul", ["x", "K1"], ["m1"], name="dense_in/MatMul"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="dense_in/Add"),
        helper.make_node("Relu", ["a1"], ["r1"], name="dense_in/Relu"),
        helper.make_node("LSTM", ["r1", "Wa", "Ra", "Ba", "", "ha", "ca", "Pa"],
                         ["Ya", "Ya_h", "Ya_c"], name="lstm_a", hidden_size=Ha, input_forget=1,
                         clip=2.5),
        helper.make_node("Squeeze", ["Ya", "ax1"], ["ya"], name="sq_a"),
        helper.make_node("GRU", ["ya", "Wg", "Rg", "Bg", "", "hg"], ["Yg", "Yg_h"], name="gru",
                         hidden_size=Hg, linear_before_reset=1),
        helper.make_node("Squeeze", ["Yg", "ax1"], ["yg"], name="sq_g"),
        helper.make_node("LSTM", ["yg", "Wb", "Rb", "Bb", "", "hb", "cb"],
                         ["Yb", "Yb_h", "Yb_c"], name="lstm_b", hidden_size=Hb,
                         activations=["HardSigmoid", "Softsign", "ScaledTanh"],
                         activation_alpha=[0.25, 0.9], activation_beta=[0.55, 1.1]),
        helper.make_node("Squeeze", ["Yb", "ax1"], ["yb"], name="sq_b"),
        helper.make_node("MatMul", ["yb", "K2"], ["m2"], name="head/MatMul"),
        helper.make_node("Add", ["m2", "b2"], ["logits"], name="head/Add"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="head/Softmax"),
    ]
    inits = [tensor("K1", rng.normal(size=(Ia, 4))), tensor("b1", rng.normal(size=4)),
             tensor("Wa", Wa), tensor("Ra", Ra), tensor("Ba", Ba), tensor("Pa", Pa),
             tensor("Wg", Wg), tensor("Rg", Rg), tensor("Bg", Bg),
             tensor("Wb", Wb), tensor("Rb", Rb), tensor("Bb", Bb),
             tensor("K2", rng.normal(size=(Hb, O)) * 2), tensor("b2", rng.normal(size=O)),
             helper.make_tensor("ax1", i64, [1], [1])]
    widths = {"ha": Ha, "ca": Ha, "hg": Hg, "hb": Hb, "cb": Hb}
    states_out = ["Ya_h", "Ya_c", "Yg_h", "Yb_h", "Yb_c"]
    proto = make(nodes, [vi("x", ["T", "N", Ia])] + [vi(k, [1, "N", w]) for k, w in widths.items()],
                 [vi("probs", None)] + [vi(o, None) for o in states_out], inits)
    model = from_onnx(proto)
    assert [la.kind for la in model.layers] == ["dense", "lstm", "gru", "lstm", "dense"]
    assert model.state_size == 2 * Ha + Hg + 2 * Hb
    sig = io_signature(proto)
    assert [(n.name, layout) for n, layout, _ in sig["recurrent"]] == \
        [("lstm_a", 0), ("gru", 0), ("lstm_b", 0)]
    assert sig["states"] == [("ha", 0, 0, 4), ("ca", 0, 4, 4), ("hg", 0, 8, 5), ("hb", 0, 13, 3),
                             ("cb", 0, 16, 3)]
    assert sig["state_size"] == model.state_size == 19
    n, T = 3, 6
    x = rng.normal(size=(n, T, Ia)).astype(np.float32)
    s0 = {k: (rng.normal(size=(n, w)) * 0.7).astype(np.float32) for k, w in widths.items()}
    probs, *finals = ort_run(proto, {"x": x.transpose(1, 0, 2),
                                     **{k: v[None] for k, v in s0.items()}})
    check_streams(model, x, np.concatenate(list(s0.values()), axis=1), probs.transpose(1, 0, 2),
                  final=np.concatenate([f[0] for f in finals], axis=1))


def test_lstm_output_y_c_on_the_data_path_is_refused():
    proto = single_lstm(outputs=("Y_c",))
    with pytest.raises(UnsupportedModelError,
                       match=r"^node 'lstm' \(LSTM\): expected Y or Y_h on the data path to the "
                             r"graph output, got its output Y_c 'Y_c' \(the cell state\)"):
        from_onnx(proto)
    proto = single_lstm(outputs=("Y_h", "Y_c"))  # two state outputs: which one is the output?
    with pytest.raises(UnsupportedModelError, match=r"^graph outputs: expected exactly one "
                                                    r"output computed through the recurrent chain"):
        from_onnx(proto)


def _parallel_gru_and_lstm():
    W, R, Bv, _ = lstm_tensors(3, 4, seed=0)
    rng = np.random.default_rng(1)
    Wg, Rg = rng.uniform(-0.5, 0.5, (1, 18, 3)), rng.uniform(-0.5, 0.5, (1, 18, 6))
    nodes = [helper.make_node("GRU", ["X", "Wg", "Rg"], ["", "h1"], hidden_size=6, name="left"),
             helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "", ""], hidden_size=4,
                              name="right")]
    inits = [tensor("W", W), tensor("R", R), tensor("B", Bv), tensor("Wg", Wg), tensor("Rg", Rg)]
    return make(nodes, [vi("X", ["T", "N", 3])], [vi("h1", None), vi("Y", None)], inits)


def test_recurrent_nodes_not_a_chain_are_listed_and_node_picks_one():
    proto = _parallel_gru_and_lstm()
    with pytest.raises(UnsupportedModelError,
                       match=r"graph has 2 recurrent nodes .*recurrent nodes: 'left' \(GRU, "
                             r"input_size=3, hidden_size=6\), 'right' \(LSTM, input_size=3, "
                             r"hidden_size=4\); pass node='<name>'"):
        from_onnx(proto)
    right = from_onnx(proto, node="right")
    assert [la.kind for la in right.layers] == ["lstm"]
    x = np.random.default_rng(2).normal(size=(3, 5, 3)).astype(np.float32)
    _, y = ort_run(proto, {"X": x.transpose(1, 0, 2)})
    check_streams(right, x, np.zeros((3, 8)), y[:, 0].transpose(1, 0, 2))
    with pytest.raises(UnsupportedModelError,
                       match=r"^node: expected the name of a GRU or LSTM node, got 'middle'; "
                             r"recurrent nodes: 'left' \(GRU, .*'right' \(LSTM, "):
        from_onnx(proto, node="middle")
    with pytest.raises(TypeError, match=r"^node: expected the name \(str\) of a GRU or LSTM node"):
        from_onnx(proto, node=1)


# --------------------------------------------------------------------------- refusals

def _with_input(proto, index, name, value=None, graph_input=None):
    """Set input ``index`` of the LSTM node to ``name``: an initializer ``value`` or a graph
    input of shape ``graph_input``."""
    node = next(n for n in proto.graph.node if n.op_type == "LSTM")
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name
    if value is not None:
        proto.graph.initializer.append(tensor(name, value))
    if graph_input is not None:
        proto.graph.input.append(graph_input)
    return proto


def _set_attribute(proto, name, value):
    next(a for a in proto.graph.node[0].attribute if a.name == name).i = value
    return proto


def _bidirectional():
    proto = single_lstm(direction="bidirectional", states=False)
    W, R, Bv, _ = lstm_tensors(3, 4, seed=0)
    proto.graph.ClearField("initializer")
    proto.graph.initializer.extend([tensor("W", np.concatenate([W, W])),
                                    tensor("R", np.concatenate([R, R])),
                                    tensor("B", np.concatenate([Bv, Bv]))])
    return proto


def _computed_initial_c():
    proto = single_lstm()
    proto.graph.node.insert(0, helper.make_node("Relu", ["c0"], ["c0r"], name="relu_c"))
    proto.graph.node[1].input[6] = "c0r"
    return proto


REFUSALS = {
    "reverse": (lambda: single_lstm(direction="reverse"),
                r"direction='reverse' is not supported: a stream is advanced one step at a time "
                r"and cannot see its future; export a forward \(unidirectional\) LSTM"),
    "bidirectional": (_bidirectional, r"direction='bidirectional' is not supported"),
    "sequence_lens": (lambda: _with_input(single_lstm(), 4, "lens", graph_input=helper
                                          .make_tensor_value_info("lens", TensorProto.INT32,
                                                                  ["N"])),
                      r"sequence_lens is not supported: streamgru advances each stream one step "
                      r"per call"),
    "nonzero_initial_h": (lambda: _with_input(single_lstm(states=False), 5, "h_const",
                                              np.full((1, 1, 4), 0.5)),
                          r"input initial_h: expected no initial_h or all zeros, got a non-zero "
                          r"constant \(max \|initial_h\| = 0\.5\).*engine\.open\(key, state=\.\.\.\)"),
    "nonzero_initial_c": (lambda: _with_input(single_lstm(states=False), 6, "c_const",
                                              np.full((1, 1, 4), -0.25)),
                          r"input initial_c: expected no initial_c or all zeros, got a non-zero "
                          r"constant \(max \|initial_c\| = 0\.25\)"),
    "computed_initial_c": (_computed_initial_c,
                           r"input initial_c: computed by Relu node 'relu_c'; expected zeros or a "
                           r"graph input \(the per-stream state\) passed through plumbing ops"),
    "unknown_activation": (lambda: single_lstm(activations=["Sigmoid", "Tanh", "Gelu"]),
                           r"activations: 'Gelu' is not an ONNX RNN activation; expected one of"),
    "two_activations": (lambda: single_lstm(activations=["Sigmoid", "Tanh"]),
                        r"activations: expected 3 names \(f, g, h\) for a forward LSTM, got "
                        r"\['Sigmoid', 'Tanh'\]"),
    "unconsumed_alpha": (lambda: single_lstm(activations=["Sigmoid", "Tanh", "LeakyRelu"],
                                             activation_alpha=[0.25, 0.5]),
                         r"activation_alpha=\[0\.25, 0\.5\] / activation_beta=\[\] have values "
                         r"that no activation in \['Sigmoid', 'Tanh', 'LeakyRelu'\] consumes"),
    "alpha_without_activations": (lambda: single_lstm(activation_alpha=[0.1]),
                                  r"activation_alpha/activation_beta given without activations; "
                                  r"the defaults \(sigmoid, tanh, tanh\) take no parameters"),
    "unknown_attribute": (lambda: single_lstm(output_sequence=1),
                          r"attribute 'output_sequence' is not implemented by streamgru; "
                          r"refusing rather than ignoring it"),
    "layout_2": (lambda: single_lstm(layout=2), r"layout: expected 0 or 1, got 2"),
    "input_forget_2": (lambda: single_lstm(input_forget=2),
                       r"input_forget: expected 0 or 1, got 2"),
    "clip_zero": (lambda: single_lstm(clip=0.0),
                  r"clip: expected a positive finite float or None, got 0\.0"),
    "hidden_size": (lambda: _set_attribute(single_lstm(), "hidden_size", 5),
                    r"hidden_size: expected 4 \(from W\), got 5"),
    "P_shape": (lambda: _with_input(single_lstm(), 7, "P4", np.zeros((1, 4 * 4))),
                r"P: expected shape \(1, 12\) \(peepholes i, o, f\), got \(1, 16\)"),
    "P_not_constant": (lambda: _with_input(single_lstm(), 7, "Pin", graph_input=vi("Pin", [1, 12])),
                       r"input P: expected a constant tensor, got 'Pin' which depends on a graph "
                       r"input"),
    "B_shape": (lambda: _with_input(single_lstm(bias=False), 3, "B6", np.zeros((1, 6 * 4))),
                r"B: expected shape \(1, 32\), got \(1, 24\)"),
    "gru_sized_W": (lambda: _with_input(single_lstm(), 1, "W3", np.zeros((1, 3 * 4 + 1, 3))),
                    r"W: expected shape \(1, 4\*hidden_size, input_size\), got \(1, 13, 3\)"),
    "extra_input": (lambda: _with_input(single_lstm(), 8, "extra", np.zeros(1)),
                    r"expected at most 8 inputs, got 9"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal_names_the_node_and_the_reason(case):
    build, reason = REFUSALS[case]
    with pytest.raises(UnsupportedModelError, match=r"^node 'lstm' \(LSTM\)(: | )" + reason):
        from_onnx(build())


def test_computed_initial_state_is_taken_with_node():
    """What the chain refuses (an initial_c computed by a value-changing op) is the stream's
    state when the node is named."""
    model = from_onnx(_computed_initial_c(), node="lstm")
    assert "node 'lstm': its initial_h 'h0' (a graph input) and initial_c 'c0r' (computed by " \
           "Relu node 'relu_c') are taken as the per-stream state (initial_h = elements 0:4, " \
           "initial_c = elements 4:8 of a stream's state), kept in the engine" in model.notes


def test_no_recurrent_node_refused_with_advice(tmp_path):
    cell = nn.LSTMCell(3, 4)
    path = tmp_path / "cell.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(cell, (torch.randn(1, 3), (torch.randn(1, 4), torch.randn(1, 4))),
                          str(path), dynamo=False)
    with pytest.raises(UnsupportedModelError, match=r"^graph has no GRU or LSTM node \(found: .*\); "
                                                    r"this looks like an unrolled recurrent cell "
                                                    r".*nn\.LSTMCell.*converters\.from_torch"):
        from_onnx(path)
    rnn = make([helper.make_node("RNN", ["X", "W", "R"], ["Y"], hidden_size=2, name="rnn")],
               [vi("X", ["T", "N", 1])], [vi("Y", None)],
               [tensor("W", np.zeros((1, 2, 1))), tensor("R", np.zeros((1, 2, 2)))])
    with pytest.raises(UnsupportedModelError, match=r"^graph has no GRU or LSTM node \(found: "
                                                    r"RNN x1\); streamgru runs GRU and LSTM "
                                                    r"layers, not the simple RNN"):
        from_onnx(rnn)


# --------------------------------------------------------------------------- torch exports

class LSTMHead(nn.Module):
    """Linear -> tanh -> 2-layer LSTM -> Linear, returning (y, (h_n, c_n))."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(I, 4)
        self.lstm = nn.LSTM(4, H, num_layers=2, batch_first=True)
        self.out = nn.Linear(H, 2)

    def forward(self, x, state=None):
        y, state = self.lstm(torch.tanh(self.inp(x)), state)
        return self.out(y), state


KINDS = {
    "lstm1": lambda: nn.LSTM(I, H),
    "lstm2_batch_first": lambda: nn.LSTM(I, H, num_layers=2, batch_first=True),
    "lstm_nobias": lambda: nn.LSTM(I, H, bias=False),
    "lstm_linear_heads": LSTMHead,
}


def _build(kind):
    torch.manual_seed(sorted(KINDS).index(kind) + 100)
    return KINDS[kind]().eval()


def _ort_torch_graph(path, module, xs, states, stepwise):
    """onnxruntime's outputs (n, T, O) for the exported ``module`` from per-stream ``states``
    (n, state_size: per layer h then C), over xs (n, T, I): one run over the sequence, or with
    ``stepwise`` one run per step, fed back its (h_n, c_n) outputs."""
    rnn = _rnn(module)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    takes_state = len(sess.get_inputs()) == 3
    per = np.asarray(states, np.float32).reshape(len(xs), rnn.num_layers, 2, rnn.hidden_size)
    h, c = (np.ascontiguousarray(per[:, :, k].transpose(1, 0, 2)) for k in (0, 1))

    def run(x_bti, h, c):
        x = x_bti if rnn.batch_first else x_bti.transpose(1, 0, 2)
        feeds = {"x": np.ascontiguousarray(x, np.float32)}
        if takes_state:
            feeds.update(h=h, c=c)
        y, *rest = sess.run(None, feeds)
        return (y if rnn.batch_first else y.transpose(1, 0, 2)), rest

    if not stepwise:
        return run(xs, h, c)[0]
    ys = []
    for t in range(xs.shape[1]):
        y, (h, c) = run(xs[:, t:t + 1], h, c)
        ys.append(y[:, 0])
    return np.stack(ys, axis=1)


def _check_torch_row(tmp_path, kind, exporter, dynamic, with_h0, T):
    module = _build(kind)
    path = tmp_path / f"{kind}.onnx"
    _export(module, exporter, dynamic, with_h0, T, path)
    model = from_onnx(path)
    rnn = _rnn(module)
    assert [la.kind for la in model.layers if la.recurrent] == ["lstm"] * rnn.num_layers
    rng = np.random.default_rng(7)
    xs = rng.normal(size=(B, STEPS, I)).astype(np.float32)
    states = np.zeros((B, model.state_size), np.float32)
    if with_h0:
        states = rng.uniform(-0.8, 0.8, states.shape).astype(np.float32)
        states[:, H:2 * H] *= 3  # C beyond the range of h
        noted = [n for n in model.notes if "initial_h and initial_c come from graph input(s) "
                 "['c', 'h']" in n]
        assert len(noted) == rnn.num_layers, model.notes
    want = _ort_torch_graph(path, module, xs, states, stepwise=T == 1 and not dynamic)
    check_streams(model, xs, states, want)
    return path, model


LEGACY = [(k, True, h, STEPS) for k in KINDS for h in (False, True)] + [
    ("lstm2_batch_first", False, True, STEPS),  # fixed shapes
    ("lstm_linear_heads", False, True, 1),      # one step per call, the state fed back
]
DYNAMO = [
    ("lstm_linear_heads", False, True, STEPS),
    ("lstm1", True, False, STEPS),
    ("lstm2_batch_first", True, True, STEPS),
    ("lstm_nobias", False, True, 1),
]


def _ids(rows):
    return ["-".join([k, "dynamic" if d else "fixed", "h0c0" if h else "no_state", f"T{t}"])
            for k, d, h, t in rows]


@pytest.mark.parametrize("kind, dynamic, with_h0, T", LEGACY, ids=_ids(LEGACY))
def test_torch_legacy_exporter(tmp_path, kind, dynamic, with_h0, T):
    _check_torch_row(tmp_path, kind, "legacy", dynamic, with_h0, T)


@pytest.mark.parametrize("kind, dynamic, with_h0, T", [
    pytest.param(*row, marks=[pytest.mark.slow] * (i > 0)) for i, row in enumerate(DYNAMO)],
    ids=_ids(DYNAMO))
def test_torch_dynamo_exporter(tmp_path, kind, dynamic, with_h0, T):
    pytest.importorskip("onnxscript")
    _check_torch_row(tmp_path, kind, "dynamo", dynamic, with_h0, T)


class GRUAndLSTM(nn.Module):
    """Linear -> relu -> LSTM -> GRU -> 2-layer LSTM -> Linear, each state an input and output."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(I, 4)
        self.a = nn.LSTM(4, 5)
        self.g = nn.GRU(5, 6)
        self.b = nn.LSTM(6, 4, num_layers=2, bias=False)
        self.out = nn.Linear(4, 2)

    def forward(self, x, ha, ca, hg, hb, cb):
        y, (ha, ca) = self.a(torch.relu(self.inp(x)), (ha, ca))
        y, hg = self.g(y, hg)
        y, (hb, cb) = self.b(y, (hb, cb))
        return self.out(y), ha, ca, hg, hb, cb


STATES = {"ha": (1, 5), "ca": (1, 5), "hg": (1, 6), "hb": (2, 4), "cb": (2, 4)}


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["legacy", "dynamo"])
def test_torch_module_mixing_gru_and_lstm(tmp_path, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(5)
    module = GRUAndLSTM().eval()
    n, T = 3, 6
    rng = np.random.default_rng(8)
    x = rng.normal(size=(T, n, I)).astype(np.float32)
    s0 = {k: rng.uniform(-0.8, 0.8, (L, n, w)).astype(np.float32) for k, (L, w) in STATES.items()}
    path = tmp_path / "mixed.onnx"
    export_module(torch, module, (torch.from_numpy(x), *map(torch.from_numpy, s0.values())),
                  path, dynamo, input_names=["x", *STATES],
                  output_names=["y", *(f"{k}_n" for k in STATES)])
    model = from_onnx(path)
    assert [la.kind for la in model.layers] == ["dense", "lstm", "gru", "lstm", "lstm", "dense"]
    y, *finals = ort_run(onnx.load(str(path)), {"x": x, **s0})
    # A stream's state, layer by layer: a's h, C; g's h; b's layer 0 h, C; layer 1 h, C.
    def flat(s):
        return np.concatenate([s["ha"][0], s["ca"][0], s["hg"][0], s["hb"][0], s["cb"][0],
                               s["hb"][1], s["cb"][1]], axis=1)
    check_streams(model, x.transpose(1, 0, 2), flat(s0), y.transpose(1, 0, 2),
                  final=flat(dict(zip(STATES, finals, strict=True))))


class CacheStream(nn.Module):
    """A streaming graph whose GRU and LSTM read their states from one cache tensor
    (1, B, 5 + 6 + 6): the GRU's h is sliced out and written back (ScatterND); the LSTM's h
    and C are sliced out of the updated cache."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(I, 4)
        self.g1 = nn.GRU(4, 5)
        self.l2 = nn.LSTM(5, 6)

    def forward(self, x, cache):
        y1, h1 = self.g1(torch.relu(self.enc(x)), cache[:, :, :5].contiguous())
        cache = cache.clone()
        cache[:, :, :5] = h1
        y2, (h2, c2) = self.l2(y1 * 0.5 + torch.sigmoid(y1),
                               (cache[:, :, 5:11].contiguous(), cache[:, :, 11:].contiguous()))
        return y2, torch.cat([h1, h2, c2], dim=-1)


def test_node_picks_an_lstm_of_a_streaming_graph(tmp_path):
    torch.manual_seed(3)
    path = tmp_path / "stream.onnx"
    x, cache = torch.randn(STEPS, B, I), torch.randn(1, B, 17) * 0.7
    export_module(torch, CacheStream().eval(), (x, cache), path, False,
                  input_names=["x", "cache"], output_names=["y", "new_cache"])
    proto = onnx.load(str(path))
    (lstm,) = [n for n in proto.graph.node if n.op_type == "LSTM"]
    (gru,) = [n for n in proto.graph.node if n.op_type == "GRU"]
    with pytest.raises(UnsupportedModelError,
                       match=rf"recurrent nodes: {re.escape(repr(gru.name))} \(GRU, input_size=4, "
                             rf"hidden_size=5\), {re.escape(repr(lstm.name))} \(LSTM, "
                             rf"input_size=5, hidden_size=6\); pass node="):
        from_onnx(proto)
    model = from_onnx(path, node=lstm.name)
    assert [(la.kind, la.hidden_size) for la in model.layers] == [("lstm", 6)]
    assert any(f"node {lstm.name!r}: its initial_h {lstm.input[5]!r} (computed by" in n and
               "initial_c = elements 6:12 of a stream's state" in n for n in model.notes)
    # The reference: onnxruntime's values of the node's X, initial_h, initial_c and Y in the
    # whole graph.
    probe = onnx.load(str(path))
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(v) for v in
                              (*(lstm.input[i] for i in (0, 5, 6)), lstm.output[0]))
    X, h0, c0, Y = ort_run(probe, {"x": x.numpy(), "cache": cache.numpy()})
    check_streams(model, X.transpose(1, 0, 2), np.concatenate([h0[0], c0[0]], axis=1),
                  Y[:, 0].transpose(1, 0, 2))


def test_info_shows_the_lstm_layers_and_the_notes(tmp_path, capsys):
    path = tmp_path / "lstm.onnx"
    onnx.save_model(single_lstm(P=True, clip=1.5, input_forget=1), str(path))
    assert cli_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer 0: lstm proj_size=0 f=sigmoid g=tanh h=tanh clip=1.5 peepholes=yes " \
           "input_forget=1" in out, out
    assert "note: node 'lstm': its initial_h and initial_c come from graph input(s) " \
           "['c0', 'h0']" in out
    assert "note: graph output 'Y_h' only re-exposes recurrent states (Y_h, Y_c)" in out
    assert "note: graph output 'Y_c' only re-exposes recurrent states (Y_h, Y_c)" in out
