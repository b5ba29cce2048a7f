"""The float64 oracle (tests/oracle.py) against the real frameworks.

Every engine test trusts ``oracle``; this file is what makes "engine == oracle" mean
"engine == the world". Models are built here directly from arrays (no converter): each test
writes out the framework-to-canonical reordering itself, so a converter bug cannot hide an
oracle bug or the other way round.

1. ``torch.nn.GRU`` in float64 (within 1e-10), 1 and 2 layers, with and without bias, with an
   ``nn.Linear`` + activation before and after, 50 steps, batch of 3, nonzero initial state.
2. onnxruntime's ``GRU`` operator (single-node graphs made with ``onnx.helper``) for
   ``linear_before_reset`` 0 and 1, every activation ONNX allows for f and g with explicit
   non-default alpha/beta, and ``clip``. How ORT reads ``activation_alpha``/``activation_beta``
   is pinned down by experiment in ``test_ort_alpha_beta_consumption_rule`` (see ``_ort_params``).
3. Dense activations against their torch functional equivalents.
4. The LSTM oracle (``oracle.lstm_cell``): against ``torch.nn.LSTM`` (float64, with proj_size)
   through ``converters._util.ifco_to_iofc``, against onnxruntime's ``LSTM`` operator, and on the
   shipped LSTM classifier (torch's held-out accuracy).
"""

import functools
import json
from pathlib import Path

import numpy as np
import oracle
import pytest
from helpers import LSTMSpec, torch_to_canonical

import streamgru
from converters._util import ifco_to_iofc, iofc_to_ifco, keras_lstm_tensors
from streamgru.model import DenseLayer, GRULayer, GRUModel

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the checks against torch are skipped, the others still run
    torch = F = None

try:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
except ImportError:
    onnx = ort = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
needs_ort = pytest.mark.skipif(ort is None, reason="onnx/onnxruntime are not installed")

N = 3  # streams (batch)
T = 50  # steps


def _max_err(a, b):
    """Largest absolute difference; inf when either side has diverged (so "> tol" holds)."""
    with np.errstate(all="ignore"):
        d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max()) if np.isfinite(d).all() else float("inf")


def _oracle_steps(model, x, h0):
    """Via oracle.step (``model`` may be a list of layers): x (T, n, I), h0 (n, state_size) ->
    ys (T, n, O), states (T, n, S)."""
    ys, states, s = [], [], h0
    for t in range(x.shape[0]):
        y, s = oracle.step(model, s, x[t])
        ys.append(y)
        states.append(s)
    return np.stack(ys), np.stack(states)


# --------------------------------------------------------------------------------------------
# 1. torch.nn.GRU, float64
# --------------------------------------------------------------------------------------------

TORCH_TOL = 1e-10


def _np(p):
    return p.detach().numpy().astype(np.float64)


def _torch_act(name):
    return {
        "relu": torch.relu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "softmax": lambda v: torch.softmax(v, dim=-1),
    }[name]


def _torch_stack(num_layers, bias, act, seed=0):
    """A float64 torch stack [Linear+act] -> GRU -> [Linear+act] and the same as a GRUModel."""
    torch.manual_seed(seed)
    I, H, O = 4, 6, 3
    I0 = 5 if act else I
    before = torch.nn.Linear(I0, I).double() if act else None
    gru = torch.nn.GRU(I, H, num_layers=num_layers, bias=bias).double()
    after = torch.nn.Linear(H, O).double() if act else None

    layers = []
    if act:
        layers.append(DenseLayer(I0, I, _np(before.weight), _np(before.bias), activation=act))
    for k in range(num_layers):
        W = torch_to_canonical(_np(getattr(gru, f"weight_ih_l{k}")))
        R = torch_to_canonical(_np(getattr(gru, f"weight_hh_l{k}")))
        Wb = torch_to_canonical(_np(getattr(gru, f"bias_ih_l{k}"))) if bias else None
        Rb = torch_to_canonical(_np(getattr(gru, f"bias_hh_l{k}"))) if bias else None  # b_hn is Rb_n
        # PyTorch applies r to (W_hn h + b_hn): linear_before_reset=1.
        layers.append(GRULayer(I if k == 0 else H, H, W, R, Wb, Rb, linear_before_reset=1))
    if act:
        layers.append(DenseLayer(H, O, _np(after.weight), _np(after.bias), activation=act))
    model = GRUModel(layers)

    def step(x_t, h):
        """x_t (n, I0) tensor, h (num_layers, n, H) -> y (n, O), h'."""
        with torch.no_grad():
            v = _torch_act(act)(before(x_t)) if act else x_t
            y, h = gru(v[None], h)
            v = y[0]
            return (_torch_act(act)(after(v)) if act else v), h

    def run(x, h):
        """The whole sequence in one call: x (T, n, I0) -> y (T, n, O)."""
        with torch.no_grad():
            v = _torch_act(act)(before(x)) if act else x
            y, _ = gru(v, h)
            return _torch_act(act)(after(y)) if act else y

    return model, step, run, (I0, H)


def _flat_state(h):
    """torch h (num_layers, n, H) -> oracle state (n, num_layers * H), layers in order."""
    return np.concatenate([_np(h[k]) for k in range(h.shape[0])], axis=1)


@needs_torch
@pytest.mark.parametrize("act", [None, "relu", "tanh", "sigmoid", "softmax"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_oracle_matches_torch_gru_step_by_step(num_layers, bias, act):
    model, torch_step, torch_run, (I0, H) = _torch_stack(num_layers, bias, act)
    rng = np.random.default_rng(1)
    x = rng.normal(scale=1.5, size=(T, N, I0))
    h0 = rng.normal(scale=0.7, size=(num_layers, N, H))  # nonzero initial state

    h = torch.from_numpy(h0)
    s = _flat_state(h)
    assert np.abs(s).min() > 0
    for t in range(T):
        y_t, h = torch_step(torch.from_numpy(x[t]), h)
        y_o, s = oracle.step(model, s, x[t])
        np.testing.assert_allclose(y_o, _np(y_t), rtol=TORCH_TOL, atol=TORCH_TOL,
                                   err_msg=f"output at step {t}")
        np.testing.assert_allclose(s, _flat_state(h), rtol=TORCH_TOL, atol=TORCH_TOL,
                                   err_msg=f"state at step {t}")

    # oracle.run (one stream) against torch's whole-sequence call
    y_seq = _np(torch_run(torch.from_numpy(x), torch.from_numpy(h0)))
    ys, final = oracle.run(model, x[:, 1], state=_flat_state(torch.from_numpy(h0))[1])
    np.testing.assert_allclose(ys, y_seq[:, 1], rtol=TORCH_TOL, atol=TORCH_TOL)
    np.testing.assert_allclose(final, s[1], rtol=TORCH_TOL, atol=TORCH_TOL)


@needs_torch
def test_torch_comparison_detects_gate_order_and_reset_placement():
    """The comparison above can fail: leaving torch's (r, z, n) order in place, or using
    linear_before_reset=0, moves the oracle far outside the tolerance."""
    model, torch_step, _, (I0, H) = _torch_stack(1, True, None)
    gru = model.layers[0]
    swap = torch_to_canonical  # swapping the first two blocks again undoes the swap
    unswapped = GRUModel([GRULayer(gru.input_size, H, swap(gru.W), swap(gru.R), swap(gru.Wb),
                                   swap(gru.Rb), linear_before_reset=1)])
    lbr0 = GRUModel([GRULayer(gru.input_size, H, gru.W, gru.R, gru.Wb, gru.Rb,
                              linear_before_reset=0)])
    rng = np.random.default_rng(2)
    x = rng.normal(scale=1.5, size=(5, N, I0))
    h = torch.from_numpy(rng.normal(scale=0.7, size=(1, N, H)))
    h0 = _flat_state(h)
    ys = []
    for t in range(5):
        y, h = torch_step(torch.from_numpy(x[t]), h)
        ys.append(_np(y))
    assert _max_err(_oracle_steps(model, x, h0)[0], ys) < TORCH_TOL
    assert _max_err(_oracle_steps(unswapped, x, h0)[0], ys) > 1e-3
    assert _max_err(_oracle_steps(lbr0, x, h0)[0], ys) > 1e-3


# --------------------------------------------------------------------------------------------
# 2. onnxruntime GRU
# --------------------------------------------------------------------------------------------
#
# Tolerance. ORT 1.31 has no float64 GRU kernel (it raises "GRU operator does not support double
# yet" at run time; probed by _ort_dtype below, which switches these checks to float64 should a
# future ORT gain one). In float32 the error has three sources: rounding of the float32 inputs
# and weights (the oracle gets exactly the same float32 values, widened, so none), float32
# accumulation in the GEMMs (unit roundoff 6e-8 times the sum of |terms|, a dozen terms of O(1)),
# and ORT's own sigmoid/tanh (rational approximations of ~1e-7 absolute error). Observed
# worst-case difference over the 50 steps of every case below is 3e-7 (with |h| up to ~4).
# Values near zero have no relative precision to speak of (the absolute error of the dot
# product stays), so an absolute part is needed; unbounded activations (Relu, Affine, Elu, ...)
# let |h| exceed 1, where the error scales with |h|, so a relative part is needed too:
# rtol = atol = 1e-5, ~30x above what is observed. A wrong alpha, beta, clip or reset placement
# moves the result by 5e-2 or more on these problems, and every test asserts that it lands
# at least 100 x tol away, so none of them can pass by being loose.
#
# How ORT consumes activation_alpha / activation_beta (found by experiment, see
# test_ort_alpha_beta_consumption_rule; it is also what onnxruntime's rnn_helpers.cc does):
#   * the two lists are independent cursors walked over the activations in order (f, g);
#   * an activation that takes alpha (Affine, LeakyRelu, ThresholdedRelu, ScaledTanh,
#     HardSigmoid, Elu) takes the NEXT unread entry of activation_alpha; one that takes beta
#     (Affine, ScaledTanh, HardSigmoid) the next unread entry of activation_beta; activations
#     that take no parameter consume nothing. So it is "one entry per activation that takes the
#     parameter", NOT "one entry per activation in position": f=Sigmoid, g=LeakyRelu with
#     activation_alpha=[0.3] gives g alpha 0.3.
#   * when a list runs out, the activation gets ORT's default: LeakyRelu 0.01, HardSigmoid
#     (0.2, 0.5), Elu 1.0, and 0.0 for everything else, i.e. Affine (0, 0), ThresholdedRelu 0,
#     ScaledTanh (0, 0). Those three differ from the ONNX operator defaults the spec points to
#     (Affine alpha 1.0, ThresholdedRelu alpha 1.0) and from streamgru's activations.py.
#   * surplus entries are ignored without an error.
#
# ORT 1.31 implements all eleven RNN activations in both the f and the g position (it refuses
# none), so every one is checked against ORT; no activation needed the fallback of a hand
# computation from the spec's formula. The one place where ORT and the spec's RNN table part
# ways, ThresholdedRelu at exactly x == alpha, is checked by hand below.

ORT_TOL = {np.float32: 1e-5, np.float64: 1e-9}

_ORT_TAKES_ALPHA = ("Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid", "Elu")
_ORT_TAKES_BETA = ("Affine", "ScaledTanh", "HardSigmoid")
_ORT_DEFAULTS = {"LeakyRelu": (0.01, 0.0), "HardSigmoid": (0.2, 0.5), "Elu": (1.0, 0.0)}


def _ort_params(names, alphas, betas):
    """ORT's rule: explicit (name, alpha, beta) per activation from the two attribute lists."""
    ia, ib, out = iter(alphas), iter(betas), []
    for name in names:
        alpha, beta = _ORT_DEFAULTS.get(name, (0.0, 0.0))
        if name in _ORT_TAKES_ALPHA:
            alpha = next(ia, alpha)
        if name in _ORT_TAKES_BETA:
            beta = next(ib, beta)
        out.append((name, alpha, beta))
    return out


def _positional_params(names, alphas, betas):
    """The other reading of the spec: entry i belongs to activation i (what ORT does NOT do)."""
    out = []
    for i, name in enumerate(names):
        alpha, beta = _ORT_DEFAULTS.get(name, (0.0, 0.0))
        if name in _ORT_TAKES_ALPHA and i < len(alphas):
            alpha = alphas[i]
        if name in _ORT_TAKES_BETA and i < len(betas):
            beta = betas[i]
        out.append((name, alpha, beta))
    return out


def _ort_gru_session(I, H, dtype, quiet=False, **attrs):
    et = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    node = helper.make_node("GRU", ["X", "W", "R", "B", "", "initial_h"], ["Y", "Y_h"],
                            hidden_size=H, **attrs)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "gru",
        [vi("X", et, ["T", "N", I]), vi("W", et, [1, 3 * H, I]), vi("R", et, [1, 3 * H, H]),
         vi("B", et, [1, 6 * H]), vi("initial_h", et, [1, "N", H])],
        [vi("Y", et, ["T", 1, "N", H]), vi("Y_h", et, [1, "N", H])],
    )
    # ir_version 10: onnx 1.23 writes a newer IR by default, which ORT 1.31 refuses to load.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)], ir_version=10)
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if quiet:  # the float64 probe: its expected failure is not worth a red line on stderr
        so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=1)
def _ort_dtype():
    """float64 if this onnxruntime runs GRU in double, else float32 (1.31: float32 only)."""
    feeds = {"X": np.zeros((1, 1, 1)), "W": np.zeros((1, 3, 1)), "R": np.zeros((1, 3, 1)),
             "B": np.zeros((1, 6)), "initial_h": np.zeros((1, 1, 1))}
    try:
        _ort_gru_session(1, 1, np.float64, quiet=True).run(None, feeds)
    except Exception as exc:  # noqa: BLE001  (NOT_IMPLEMENTED or RUNTIME_EXCEPTION by version)
        if "double" not in str(exc) and "implementation" not in str(exc).lower():
            raise
        return np.float32
    return np.float64


def _gru_problem(I, H, seed, w_scale=0.5, r_scale=0.35, x_scale=1.0, steps=T, z_bias=0.0):
    """ONNX-layout tensors (already rounded to the ORT dtype) and inputs with a nonzero h0.

    ``z_bias`` shifts the update gate's input bias Wb_z: with an f unbounded above (Relu,
    Softplus, ...) a z > 1 makes h' = (1 - z) n + z h expand, and 50 steps overflow.
    """
    dt = _ort_dtype()
    rng = np.random.default_rng(seed)
    B = rng.normal(scale=0.3, size=(1, 6 * H))
    B[0, :H] += z_bias
    return {
        "X": rng.normal(scale=x_scale, size=(steps, N, I)).astype(dt),
        "W": rng.normal(scale=w_scale / np.sqrt(I), size=(1, 3 * H, I)).astype(dt),
        "R": rng.normal(scale=r_scale / np.sqrt(H), size=(1, 3 * H, H)).astype(dt),
        "B": B.astype(dt),
        "initial_h": rng.normal(scale=0.5, size=(1, N, H)).astype(dt),
    }


def _oracle_vs_feeds(feeds, lbr, f, g, clip=None):
    """Oracle outputs (T, n, H) for an ONNX GRU node's tensors: W[0], R[0], B[0] = [Wb; Rb]."""
    I, H = feeds["W"].shape[2], feeds["R"].shape[2]
    layer = GRULayer(I, H, feeds["W"][0], feeds["R"][0], feeds["B"][0, :3 * H],
                     feeds["B"][0, 3 * H:], linear_before_reset=lbr, f=f, g=g, clip=clip)
    return _oracle_steps(GRUModel([layer]), feeds["X"], feeds["initial_h"][0])[0]


def _far_from(got, feeds, lbr, f, g, clip=None):
    """True when the oracle run with these (deliberately wrong) settings is > 100 x tol away.

    Wrong settings may diverge over 50 steps: that counts as far, quietly."""
    with np.errstate(all="ignore"):
        other = _oracle_vs_feeds(feeds, lbr, f, g, clip=clip)
    return _max_err(other, got) > 100 * ORT_TOL[_ort_dtype()]


def _ort_run(feeds, **attrs):
    I, H = feeds["W"].shape[2], feeds["R"].shape[2]
    y, y_h = _ort_gru_session(I, H, _ort_dtype(), **attrs).run(None, feeds)
    np.testing.assert_array_equal(y[-1], y_h)
    return y[:, 0]  # (T, num_directions=1, n, H) -> (T, n, H)


def _assert_ort_close(oracle_y, ort_y):
    tol = ORT_TOL[_ort_dtype()]
    np.testing.assert_allclose(ort_y, oracle_y, rtol=tol, atol=tol)


# Explicit non-default parameters for every activation ONNX allows in an RNN, chosen so that the
# pre-activations of this problem straddle the interesting points (ThresholdedRelu's threshold,
# HardSigmoid's corners) and the recurrence stays bounded over 50 steps.
ONNX_ACTIVATIONS = {
    "Relu": (),
    "Tanh": (),
    "Sigmoid": (),
    "Affine": (0.4, 0.3),
    "LeakyRelu": (0.2,),
    "ThresholdedRelu": (0.25,),
    "ScaledTanh": (0.8, 1.5),
    "HardSigmoid": (0.3, 0.6),
    "Elu": (0.7,),
    "Softsign": (),
    "Softplus": (),
}


def _attrs_for(f_name, g_name, lbr, clip=None):
    names = [f_name, g_name]
    params = {n: ONNX_ACTIVATIONS[n] for n in names}
    # The attribute lists as ORT reads them: one entry per activation that takes the parameter.
    alphas = [params[n][0] for n in names if n in _ORT_TAKES_ALPHA]
    betas = [params[n][1] for n in names if n in _ORT_TAKES_BETA]
    attrs = {"activations": names, "linear_before_reset": lbr}
    if alphas:
        attrs["activation_alpha"] = alphas
    if betas:
        attrs["activation_beta"] = betas
    if clip is not None:
        attrs["clip"] = clip
    f = (f_name, *params[f_name])
    g = (g_name, *params[g_name])
    return attrs, f, g


_PAIRS = [(name, "Tanh") for name in ONNX_ACTIVATIONS] + [
    ("Sigmoid", name) for name in ONNX_ACTIVATIONS if name not in ("Tanh", "Sigmoid")
] + [
    # both f and g take parameters: exercises the cursor over both lists
    ("HardSigmoid", "ScaledTanh"), ("Affine", "LeakyRelu"), ("Elu", "Affine"),
    ("ThresholdedRelu", "HardSigmoid"), ("LeakyRelu", "Elu"),
]


_UNBOUNDED_ABOVE = ("Relu", "ThresholdedRelu", "Softplus", "LeakyRelu", "Elu")


@needs_ort
@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("f_name,g_name", _PAIRS, ids=[f"{f}-{g}" for f, g in _PAIRS])
def test_oracle_matches_onnxruntime_gru(f_name, g_name, lbr):
    feeds = _gru_problem(4, 6, seed=_PAIRS.index((f_name, g_name)),
                         z_bias=-1.0 if f_name in _UNBOUNDED_ABOVE else 0.0)
    attrs, f, g = _attrs_for(f_name, g_name, lbr)
    got = _ort_run(feeds, **attrs)
    assert np.isfinite(got).all() and np.abs(got).max() < 1e3  # a meaningful, bounded run
    _assert_ort_close(_oracle_vs_feeds(feeds, lbr, f, g), got)

    # The check can fail: the other reset placement is far away, and so are default parameters.
    assert _far_from(got, feeds, 1 - lbr, f, g)
    if len(f) > 1:
        assert _far_from(got, feeds, lbr, f_name, g)  # f with streamgru's default parameters
    if len(g) > 1:
        assert _far_from(got, feeds, lbr, f, g_name)


@needs_ort
@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("f_name,g_name", [("Sigmoid", "Tanh"), ("HardSigmoid", "Elu"),
                                           ("Affine", "Softplus")])
def test_oracle_matches_onnxruntime_gru_clip(f_name, g_name, lbr):
    """ORT clamps every gate's full pre-activation (after the reset-gate product) to
    [-clip, clip], as the oracle does; weights are large enough that clip is active."""
    clip = 0.7
    feeds = _gru_problem(4, 6, seed=7, w_scale=2.0, r_scale=1.5, x_scale=1.5)
    attrs, f, g = _attrs_for(f_name, g_name, lbr, clip=clip)
    got = _ort_run(feeds, **attrs)
    _assert_ort_close(_oracle_vs_feeds(feeds, lbr, f, g, clip=clip), got)
    assert _far_from(got, feeds, lbr, f, g, clip=None)
    assert _far_from(got, feeds, lbr, f, g, clip=1.2 * clip)


# (names, activation_alpha, activation_beta, expected explicit params under ORT's rule)
_CONSUMPTION_CASES = [
    # g is the only activation with an alpha: it takes alpha[0], not alpha[1].
    (["Sigmoid", "LeakyRelu"], [0.3, 0.7], [], [("Sigmoid", 0, 0), ("LeakyRelu", 0.3, 0)]),
    # A one-entry list is enough for g (positionally it would be missing -> default 0.01).
    (["Sigmoid", "LeakyRelu"], [0.3], [], [("Sigmoid", 0, 0), ("LeakyRelu", 0.3, 0)]),
    # beta is a separate cursor: LeakyRelu takes no beta, so Affine gets beta[0].
    (["LeakyRelu", "Affine"], [0.3, 0.7], [0.2], [("LeakyRelu", 0.3, 0), ("Affine", 0.7, 0.2)]),
    (["LeakyRelu", "Affine"], [0.3, 0.7], [0.5, 0.2],
     [("LeakyRelu", 0.3, 0), ("Affine", 0.7, 0.5)]),
    (["Affine", "LeakyRelu"], [0.3, 0.6], [0.7], [("Affine", 0.3, 0.7), ("LeakyRelu", 0.6, 0)]),
    # Lists that run out: ORT's defaults (LeakyRelu 0.01, HardSigmoid 0.2/0.5, Elu 1.0, else 0).
    (["Affine", "LeakyRelu"], [0.3], [0.7], [("Affine", 0.3, 0.7), ("LeakyRelu", 0.01, 0)]),
    (["HardSigmoid", "Elu"], [], [], [("HardSigmoid", 0.2, 0.5), ("Elu", 1.0, 0)]),
    (["Affine", "Tanh"], [], [], [("Affine", 0.0, 0.0), ("Tanh", 0, 0)]),
    (["Sigmoid", "ScaledTanh"], [], [], [("Sigmoid", 0, 0), ("ScaledTanh", 0.0, 0.0)]),
    (["ThresholdedRelu", "Tanh"], [], [], [("ThresholdedRelu", 0.0, 0), ("Tanh", 0, 0)]),
    # Surplus entries are ignored; parameter-free activations ignore the lists altogether.
    (["Sigmoid", "LeakyRelu"], [0.3, 0.7, 0.9], [], [("Sigmoid", 0, 0), ("LeakyRelu", 0.3, 0)]),
    (["Softsign", "Softplus"], [0.3, 0.7], [0.1], [("Softsign", 0, 0), ("Softplus", 0, 0)]),
]


@needs_ort
@pytest.mark.parametrize("names,alphas,betas,expected", _CONSUMPTION_CASES)
def test_ort_alpha_beta_consumption_rule(names, alphas, betas, expected):
    assert _ort_params(names, alphas, betas) == [(n, float(a), float(b)) for n, a, b in expected]
    feeds = _gru_problem(3, 5, seed=11, steps=8)
    attrs = {"activations": names}
    if alphas:
        attrs["activation_alpha"] = alphas
    if betas:
        attrs["activation_beta"] = betas
    got = _ort_run(feeds, **attrs)

    def explicit(p):
        n, a, b = p
        return (n, a if n in _ORT_TAKES_ALPHA else None, b if n in _ORT_TAKES_BETA else None)

    f, g = (explicit(p) for p in expected)
    _assert_ort_close(_oracle_vs_feeds(feeds, 0, f, g), got)
    # Where the positional reading would give other parameters, the experiment tells them apart.
    positional = _positional_params(names, alphas, betas)
    if positional != _ort_params(names, alphas, betas):
        pf, pg = (explicit(p) for p in positional)
        assert _far_from(got, feeds, 0, pf, pg)


@needs_ort
def test_ort_gru_float64_support_is_used_if_present():
    """Records the float64 finding: ORT 1.31.1 has no double GRU. If a later ORT gains one,
    _ort_dtype switches every check in this section to float64 at 1e-9."""
    dt = _ort_dtype()
    assert dt in (np.float32, np.float64)
    feeds = _gru_problem(2, 3, seed=3, steps=4)
    assert feeds["X"].dtype == dt
    assert _ort_run(feeds).dtype == dt


# ThresholdedRelu at exactly x == alpha. ORT's RNN functor, the ONNX ThresholdedRelu operator
# ("y = x for x > alpha"), torch.nn.functional.threshold and Keras ThresholdedReLU all use a
# strict '>': f(alpha) = 0. The activation table in the ONNX RNN/GRU spec text says
# "x if x >= alpha else 0", which oracle.act follows. These two tests fail until oracle.py uses
# '>' (see the report); the same '>=' is in streamgru/kernels.py and activations.py's table.

@needs_ort
@pytest.mark.parametrize("position", ["f", "g"])
def test_oracle_thresholdedrelu_is_strict_at_alpha_like_onnxruntime(position):
    alpha, dt = 0.5, _ort_dtype()
    # I = H = 1, R = 0, B = 0, x = 0.5: the gate under test sees exactly 0.5 == alpha.
    W = np.array([[[1.0], [0.0], [1.0]]]) if position == "f" else np.array([[[0.0], [0.0], [1.0]]])
    feeds = {"X": np.full((1, 1, 1), 0.5), "W": W, "R": np.zeros((1, 3, 1)),
             "B": np.zeros((1, 6)), "initial_h": np.full((1, 1, 1), 0.25)}
    feeds = {k: v.astype(dt) for k, v in feeds.items()}
    names = ["ThresholdedRelu", "Tanh"] if position == "f" else ["Sigmoid", "ThresholdedRelu"]
    got = _ort_run(feeds, activations=names, activation_alpha=[alpha])
    f = ("thresholdedrelu", alpha) if position == "f" else "sigmoid"
    g = "tanh" if position == "f" else ("thresholdedrelu", alpha)
    # Independent hand computation of ORT's value, strict '>':
    #   f: z = 0, n = tanh(0.5)                 -> h' = tanh(0.5)
    #   g: z = sigmoid(0) = 0.5, n = 0          -> h' = 0.5 * 0.25
    hand = np.tanh(0.5) if position == "f" else 0.125
    np.testing.assert_allclose(got[0, 0, 0], hand, rtol=1e-6)
    _assert_ort_close(_oracle_vs_feeds(feeds, 0, f, g), got)


@needs_torch
def test_oracle_dense_thresholdedrelu_is_strict_at_alpha_like_torch():
    alpha = 0.5
    layer = DenseLayer(3, 3, np.eye(3), activation=("thresholdedrelu", alpha))
    x = np.array([[0.25, 0.5, 0.75]])
    want = F.threshold(torch.from_numpy(x), alpha, 0.0).numpy()
    np.testing.assert_array_equal(want, [[0.0, 0.0, 0.75]])
    np.testing.assert_array_equal(oracle.dense(layer, x), want)


# --------------------------------------------------------------------------------------------
# 3. Dense activations against torch functional equivalents (float64)
# --------------------------------------------------------------------------------------------

DENSE_TOL = 1e-12


def _dense_cases():
    return [
        ("identity", (), lambda t: t),
        ("sigmoid", (), lambda t: torch.sigmoid(t)),
        ("tanh", (), lambda t: torch.tanh(t)),
        ("relu", (), lambda t: F.relu(t)),
        # torch's hardsigmoid is relu6(x + 3) / 6, i.e. alpha = 1/6, beta = 0.5
        ("hardsigmoid", (1 / 6, 0.5), lambda t: F.hardsigmoid(t)),
        ("hardsigmoid", (0.3, 0.6), lambda t: torch.clamp(0.3 * t + 0.6, 0.0, 1.0)),
        ("hardsigmoid", (), lambda t: torch.clamp(0.2 * t + 0.5, 0.0, 1.0)),  # ONNX default
        ("leakyrelu", (0.2,), lambda t: F.leaky_relu(t, 0.2)),
        ("leakyrelu", (), lambda t: F.leaky_relu(t)),  # both default to 0.01
        ("affine", (0.4, 0.3), lambda t: 0.4 * t + 0.3),
        ("thresholdedrelu", (0.25,), lambda t: F.threshold(t, 0.25, 0.0)),
        ("scaledtanh", (0.8, 1.5), lambda t: 0.8 * torch.tanh(1.5 * t)),
        ("elu", (0.7,), lambda t: F.elu(t, 0.7)),
        ("elu", (), lambda t: F.elu(t)),  # both default to 1.0
        ("softsign", (), lambda t: F.softsign(t)),
        # torch returns x itself above `threshold` (default 20, an error of e^-20 = 2e-9);
        # at 40 the shortcut is exact in float64.
        ("softplus", (), lambda t: F.softplus(t, beta=1.0, threshold=40.0)),
        ("softmax", (), lambda t: torch.softmax(t, dim=-1)),
    ]


_DENSE_IDS = ["identity", "sigmoid", "tanh", "relu", "hardsigmoid-torch", "hardsigmoid",
              "hardsigmoid-default", "leakyrelu", "leakyrelu-default", "affine",
              "thresholdedrelu", "scaledtanh", "elu", "elu-default", "softsign", "softplus",
              "softmax"]


@needs_torch
@pytest.mark.parametrize("case", range(len(_DENSE_IDS)), ids=_DENSE_IDS)
def test_oracle_dense_matches_torch(case):
    name, params, fn = _dense_cases()[case]
    rng = np.random.default_rng(case)
    n_in, n_out = 5, 7
    W = rng.normal(scale=1.5, size=(n_out, n_in))
    b = rng.normal(size=n_out)
    layer = DenseLayer(n_in, n_out, W, b, activation=(name, *params))
    x = rng.normal(scale=2.0, size=(40, n_in))
    want = fn(F.linear(torch.from_numpy(x), torch.from_numpy(W), torch.from_numpy(b))).numpy()
    got = oracle.dense(layer, x)
    np.testing.assert_allclose(got, want, rtol=DENSE_TOL, atol=DENSE_TOL)

    # The activation itself on hand-picked points: 0, the corners, large magnitudes (no
    # overflow warnings up to |x| = 700). Exactly x == alpha is left to the dedicated test.
    pts = np.array([0.0, -0.0, 1e-300, -1e-300, 0.1, -0.1, 0.2501, 0.2499, 1.0, -1.0, 1.6667,
                    -1.6667, 2.5, -2.5, 3.0, -3.0, 30.0, -30.0, 700.0, -700.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        got_pts = oracle.act(*layer.activation, pts[None] if name == "softmax" else pts)
    want_pts = fn(torch.from_numpy(pts[None] if name == "softmax" else pts)).numpy()
    np.testing.assert_allclose(got_pts, want_pts, rtol=DENSE_TOL, atol=DENSE_TOL)
    # ...and a wrong parameter would be caught on these inputs.
    _, a, be = layer.activation
    pre = x @ W.T + b
    if name in ("hardsigmoid", "leakyrelu", "affine", "thresholdedrelu", "scaledtanh", "elu"):
        assert _max_err(oracle.act(name, a * 1.5 + 0.1, be, pre), want) > 1e3 * DENSE_TOL
    if name in ("hardsigmoid", "affine", "scaledtanh"):
        assert _max_err(oracle.act(name, a, be * 1.5 + 0.1, pre), want) > 1e3 * DENSE_TOL


# --------------------------------------------------------------------------------------------
# 4. The LSTM oracle (oracle.lstm_cell / lstm_step, docs/lstm.md)
# --------------------------------------------------------------------------------------------
#
# Layers are helpers.LSTMSpec objects, so these checks hold independently of
# streamgru.LSTMLayer (tests/test_model.py checks the oracle steps both alike). The torch checks
# go through converters._util.ifco_to_iofc, so they test that reorder too.

LSTM_T = 20


def _torch_lstm(num_layers, bias, proj_size, seed=0):
    """A float64 torch.nn.LSTM (I=4, H=5) and the same layers as LSTMSpecs."""
    torch.manual_seed(seed)
    I, H = 4, 5
    lstm = torch.nn.LSTM(I, H, num_layers=num_layers, bias=bias, proj_size=proj_size).double()
    specs = []
    for k in range(num_layers):
        W = ifco_to_iofc(_np(getattr(lstm, f"weight_ih_l{k}")))
        R = ifco_to_iofc(_np(getattr(lstm, f"weight_hh_l{k}")))
        zeros = np.zeros(4 * H)
        Wb = ifco_to_iofc(_np(getattr(lstm, f"bias_ih_l{k}"))) if bias else zeros
        Rb = ifco_to_iofc(_np(getattr(lstm, f"bias_hh_l{k}"))) if bias else zeros
        proj = _np(getattr(lstm, f"weight_hr_l{k}")) if proj_size else None  # used as is
        specs.append(LSTMSpec(W, R, Wb, Rb, proj=proj))
    return lstm, specs


def _lstm_flat_state(h, c):
    """torch h (L, n, H_out), c (L, n, H) -> oracle state (n, L * (H_out + H)): per layer h, c."""
    return np.concatenate([np.concatenate([_np(h[k]), _np(c[k])], axis=1)
                           for k in range(h.shape[0])], axis=1)


@needs_torch
@pytest.mark.parametrize("proj_size", [0, 3], ids=["noproj", "proj3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm_oracle_matches_torch_step_by_step(num_layers, bias, proj_size):
    lstm, specs = _torch_lstm(num_layers, bias, proj_size)
    P, H = proj_size or 5, 5
    assert sum(s.state_size for s in specs) == num_layers * (P + H)
    rng = np.random.default_rng(5)
    x = rng.normal(scale=1.5, size=(LSTM_T, N, 4))
    h0 = rng.normal(scale=0.7, size=(num_layers, N, P))  # nonzero initial h and c
    c0 = rng.normal(scale=1.5, size=(num_layers, N, H))
    h, c = torch.from_numpy(h0), torch.from_numpy(c0)
    s = _lstm_flat_state(h, c)
    with torch.no_grad():
        for t in range(LSTM_T):
            y_t, (h, c) = lstm(torch.from_numpy(x[t:t + 1]), (h, c))
            y_o, s = oracle.lstm_step(specs, s, x[t])
            np.testing.assert_allclose(y_o, _np(y_t[0]), rtol=TORCH_TOL, atol=TORCH_TOL,
                                       err_msg=f"output at step {t}")
            np.testing.assert_allclose(s, _lstm_flat_state(h, c), rtol=TORCH_TOL,
                                       atol=TORCH_TOL, err_msg=f"state at step {t}")
        # The whole sequence in one torch call, against the oracle's steps.
        y_seq, _ = lstm(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    ys, _ = _oracle_steps(specs, x, _lstm_flat_state(torch.from_numpy(h0),
                                                          torch.from_numpy(c0)))
    np.testing.assert_allclose(ys, _np(y_seq), rtol=TORCH_TOL, atol=TORCH_TOL)


@needs_torch
def test_lstm_torch_comparison_detects_gate_order_and_state_layout():
    """The comparison above can fail: torch's (i, f, g, o) order left in place, or the state read
    as c then h, lands far outside the tolerance."""
    lstm, (spec,) = _torch_lstm(1, True, 3)
    rng = np.random.default_rng(6)
    x = rng.normal(scale=1.5, size=(5, N, 4))
    h, c = torch.from_numpy(rng.normal(size=(1, N, 3))), torch.from_numpy(rng.normal(size=(1, N, 5)))
    s0 = _lstm_flat_state(h, c)
    with torch.no_grad():
        want = _np(lstm(torch.from_numpy(x), (h, c))[0])
    back = iofc_to_ifco
    np.testing.assert_array_equal(back(spec.W), np.concatenate(  # the inverse, written out
        [spec.W[:5], spec.W[10:15], spec.W[15:], spec.W[5:10]]))
    np.testing.assert_array_equal(ifco_to_iofc(back(spec.W)), spec.W)
    unordered = LSTMSpec(back(spec.W), back(spec.R), back(spec.Wb), back(spec.Rb), proj=spec.proj)
    c_then_h = np.concatenate([_np(c[0]), _np(h[0])], axis=1)
    assert _max_err(_oracle_steps([spec], x, s0)[0], want) < TORCH_TOL
    assert _max_err(_oracle_steps([unordered], x, s0)[0], want) > 1e-3
    assert _max_err(_oracle_steps([spec], x, c_then_h)[0], want) > 1e-3


def _keras_lstm_cell(kernel, recurrent, bias, x, h, c):
    """Keras's LSTMCell.call, transcribed (keras/src/layers/rnn/lstm.py): one fused product,
    split into (i, f, c, o) column blocks; default activations."""
    z = x @ kernel + h @ recurrent + bias
    zi, zf, zc, zo = np.split(z, 4, axis=1)
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    c = sig(zf) * c + sig(zi) * np.tanh(zc)
    return sig(zo) * np.tanh(c), c


def test_lstm_keras_layout_through_keras_lstm_tensors():
    """Keras is not installed here: keras_lstm_tensors is checked against a transcription of
    Keras's cell, and the check fails without the reorder."""
    rng = np.random.default_rng(7)
    I, H = 3, 4
    kernel, recurrent = rng.normal(size=(I, 4 * H)) * 0.6, rng.normal(size=(H, 4 * H)) * 0.4
    bias = rng.normal(size=4 * H) * 0.3
    spec = LSTMSpec(*keras_lstm_tensors(kernel, recurrent, bias))
    assert np.all(spec.Rb == 0)
    x = rng.normal(size=(6, N, I))
    h, c = rng.normal(size=(N, H)), rng.normal(size=(N, H))
    ys, _ = _oracle_steps([spec], x, np.concatenate([h, c], axis=1))
    want = []
    for t in range(6):
        h, c = _keras_lstm_cell(kernel, recurrent, bias, x[t], h, c)
        want.append(h)
    np.testing.assert_allclose(ys, want, rtol=1e-12, atol=1e-12)
    plain = LSTMSpec(kernel.T, recurrent.T, bias, np.zeros(4 * H))  # transposed, not reordered
    assert _max_err(_oracle_steps([plain], x, np.zeros((N, 2 * H)))[0],
                    _oracle_steps([spec], x, np.zeros((N, 2 * H)))[0]) > 1e-3


# onnxruntime's LSTM operator. Same tolerance reasoning as the GRU's (section 2): ORT 1.32 runs
# LSTM in float32 only ("LSTM operator does not support double yet"; probed below, switching to
# float64 should a later version have it), and reads activation_alpha/_beta by the same cursor
# rule over the three activations f, g, h (_ort_params). It accepts all eleven RNN activations
# in each of the three positions, so every one is checked against it; none is left untested.


def _ort_lstm_session(I, H, dtype, quiet=False, **attrs):
    et = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "", "initial_h", "initial_c", "P"],
                            ["Y", "Y_h", "Y_c"], hidden_size=H, **attrs)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "lstm",
        [vi("X", et, ["T", "N", I]), vi("W", et, [1, 4 * H, I]), vi("R", et, [1, 4 * H, H]),
         vi("B", et, [1, 8 * H]), vi("initial_h", et, [1, "N", H]),
         vi("initial_c", et, [1, "N", H]), vi("P", et, [1, 3 * H])],
        [vi("Y", et, ["T", 1, "N", H]), vi("Y_h", et, [1, "N", H]), vi("Y_c", et, [1, "N", H])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)], ir_version=10)
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if quiet:
        so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=1)
def _ort_lstm_dtype():
    """float64 if this onnxruntime runs LSTM in double, else float32 (1.32: float32 only)."""
    feeds = {k: np.zeros(s) for k, s in [("X", (1, 1, 1)), ("W", (1, 4, 1)), ("R", (1, 4, 1)),
                                         ("B", (1, 8)), ("initial_h", (1, 1, 1)),
                                         ("initial_c", (1, 1, 1)), ("P", (1, 3))]}
    try:
        _ort_lstm_session(1, 1, np.float64, quiet=True).run(None, feeds)
    except Exception as exc:  # noqa: BLE001  (NOT_IMPLEMENTED or RUNTIME_EXCEPTION by version)
        if "double" not in str(exc) and "implementation" not in str(exc).lower():
            raise
        return np.float32
    return np.float64


def _lstm_problem(I, H, seed, peepholes=True, scale=0.5, steps=LSTM_T, f_bias=0.0):
    """An LSTMSpec and ORT feeds for it (tensors rounded to the ORT dtype), nonzero h0 and c0.

    ``f_bias`` shifts the forget gate's bias: with an f unbounded above (Relu, Softplus, ...)
    a forget gate > 1 makes C grow geometrically."""
    dt = _ort_lstm_dtype()
    spec = LSTMSpec.random(I, H, seed, peepholes=peepholes, scale=scale)
    rng = np.random.default_rng(seed + 1000)
    Wb = spec.Wb.copy()
    Wb[2 * H:3 * H] += f_bias
    feeds = {
        "X": rng.normal(size=(steps, N, I)), "W": spec.W[None], "R": spec.R[None],
        "B": np.concatenate([Wb, spec.Rb])[None],
        "initial_h": rng.normal(scale=0.5, size=(1, N, H)),
        "initial_c": rng.normal(scale=1.0, size=(1, N, H)),
        "P": (spec.P if peepholes else np.zeros(3 * H))[None],
    }
    return {k: v.astype(dt) for k, v in feeds.items()}


def _lstm_oracle_vs_feeds(feeds, peepholes=True, **kw):
    """Oracle (Y (T, n, H), final c (n, H)) for an ONNX LSTM node's feeds; ``kw``: the spec's
    clip, input_forget, f, g, h."""
    H = feeds["R"].shape[2]
    spec = LSTMSpec(feeds["W"][0], feeds["R"][0], feeds["B"][0, :4 * H], feeds["B"][0, 4 * H:],
                    P=feeds["P"][0] if peepholes else None, **kw)
    s0 = np.concatenate([feeds["initial_h"][0], feeds["initial_c"][0]], axis=1)
    ys, states = _oracle_steps([spec], feeds["X"], s0)
    return ys, states[-1][:, H:]


def _ort_lstm_run(feeds, **attrs):
    """ORT's Y (T, n, H) and final c (n, H)."""
    I, H = feeds["W"].shape[2], feeds["R"].shape[2]
    y, y_h, y_c = _ort_lstm_session(I, H, _ort_lstm_dtype(), **attrs).run(None, feeds)
    np.testing.assert_array_equal(y[-1], y_h)
    return y[:, 0], y_c[0]


def _assert_lstm_close(got, want):
    tol = ORT_TOL[_ort_lstm_dtype()]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


def _lstm_far(got, feeds, peepholes=True, **kw):
    """True when the oracle with these (deliberately wrong) settings is > 100 x tol from ORT."""
    with np.errstate(all="ignore"):
        other = _lstm_oracle_vs_feeds(feeds, peepholes, **kw)
    return _max_err(other[0], got[0]) > 100 * ORT_TOL[_ort_lstm_dtype()]


def _lstm_first_step_by_hand(feeds, clip=None, o_reads_old_c=False, clip_c=False):
    """ORT's first output h (n, H) with default activations, computed by hand from the ONNX
    equations, and two readings the spec's text leaves open: the output gate's peephole reading
    the old C, and clip applied to C before h."""
    H = feeds["R"].shape[2]
    c = feeds["initial_c"][0].astype(np.float64)
    z = (feeds["X"][0] @ feeds["W"][0].T + feeds["initial_h"][0] @ feeds["R"][0].T
         + feeds["B"][0, :4 * H] + feeds["B"][0, 4 * H:]).astype(np.float64)
    zi, zo, zf, zc = np.split(z, 4, axis=1)
    pi, po, pf = np.split(feeds["P"][0].astype(np.float64), 3)
    k = (lambda v: v) if clip is None else (lambda v: np.clip(v, -clip, clip))
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    c1 = sig(k(zf + pf * c)) * c + sig(k(zi + pi * c)) * np.tanh(k(zc))
    o = sig(k(zo + po * (c if o_reads_old_c else c1)))
    return o * np.tanh(np.clip(c1, -clip, clip) if clip_c else c1)


@needs_ort
def test_lstm_oracle_matches_onnxruntime_peepholes():
    feeds = _lstm_problem(3, 5, seed=0)
    got = _ort_lstm_run(feeds)
    _assert_lstm_close(got, _lstm_oracle_vs_feeds(feeds))
    assert _lstm_far(got, feeds, peepholes=False)
    # The output gate's peephole reads the new C', as the oracle does; the old C is far away.
    tol = ORT_TOL[_ort_lstm_dtype()]
    np.testing.assert_allclose(_lstm_first_step_by_hand(feeds), got[0][0], rtol=tol, atol=tol)
    assert _max_err(_lstm_first_step_by_hand(feeds, o_reads_old_c=True), got[0][0]) > 100 * tol


@needs_ort
def test_lstm_oracle_matches_onnxruntime_without_peepholes():
    feeds = _lstm_problem(3, 5, seed=1, peepholes=False)
    got = _ort_lstm_run(feeds)
    _assert_lstm_close(got, _lstm_oracle_vs_feeds(feeds, peepholes=False))


@needs_ort
def test_lstm_oracle_matches_onnxruntime_input_forget():
    feeds = _lstm_problem(3, 5, seed=2)
    got = _ort_lstm_run(feeds, input_forget=1)
    _assert_lstm_close(got, _lstm_oracle_vs_feeds(feeds, input_forget=1))
    assert _lstm_far(got, feeds, input_forget=0)


@needs_ort
def test_lstm_oracle_matches_onnxruntime_clip():
    """Clip clamps the gate and candidate pre-activations, not the cell state that h reads: the
    weights and the initial C are large enough that both exceed the clip."""
    clip = 0.8
    feeds = _lstm_problem(3, 5, seed=3, scale=2.5)
    feeds["initial_c"] *= 4
    got = _ort_lstm_run(feeds, clip=clip)
    _assert_lstm_close(got, _lstm_oracle_vs_feeds(feeds, clip=clip))
    assert _lstm_far(got, feeds, clip=None)
    assert _lstm_far(got, feeds, clip=1.2 * clip)
    tol = ORT_TOL[_ort_lstm_dtype()]
    np.testing.assert_allclose(_lstm_first_step_by_hand(feeds, clip), got[0][0], rtol=tol, atol=tol)
    assert _max_err(_lstm_first_step_by_hand(feeds, clip, clip_c=True), got[0][0]) > 100 * tol


_LSTM_POSITIONS = {"f": 0, "g": 1, "h": 2}
_LSTM_ACTS = [(pos, name) for pos in _LSTM_POSITIONS for name in ONNX_ACTIVATIONS
              if name != ("Sigmoid", "Tanh", "Tanh")[_LSTM_POSITIONS[pos]]]


@needs_ort
@pytest.mark.parametrize("pos,name", _LSTM_ACTS, ids=[f"{p}-{n}" for p, n in _LSTM_ACTS])
def test_lstm_oracle_matches_onnxruntime_activation(pos, name):
    """Each activation in each of the positions f, g, h, with explicit non-default alpha/beta,
    the other two at their defaults (peepholes on)."""
    names = ["Sigmoid", "Tanh", "Tanh"]
    names[_LSTM_POSITIONS[pos]] = name
    params = ONNX_ACTIVATIONS[name]
    attrs = {"activations": names}
    if name in _ORT_TAKES_ALPHA:
        attrs["activation_alpha"] = [params[0]]
    if name in _ORT_TAKES_BETA:
        attrs["activation_beta"] = [params[1]]
    unbounded_gate = pos == "f" and name in _UNBOUNDED_ABOVE + ("Affine",)
    feeds = _lstm_problem(3, 4, seed=len(name) + 10 * _LSTM_POSITIONS[pos],
                          f_bias=-3.0 if unbounded_gate else 0.0)
    got = _ort_lstm_run(feeds, **attrs)
    assert all(np.isfinite(v).all() and np.abs(v).max() < 1e3 for v in got)  # a meaningful run
    acts = dict(zip("fgh", (n.lower() for n in names)))
    acts[pos] = (name.lower(), *params)
    _assert_lstm_close(got, _lstm_oracle_vs_feeds(feeds, **acts))
    # The check can fail: the activation at its default parameters (or, parameter-free, the
    # position's default activation) is far away.
    wrong = dict(acts)
    wrong[pos] = name.lower() if params else ("sigmoid", "tanh", "tanh")[_LSTM_POSITIONS[pos]]
    assert _lstm_far(got, feeds, **wrong)


@needs_ort
def test_lstm_oracle_matches_onnxruntime_alpha_beta_over_three_activations():
    """ORT's cursor rule over f, g, h: HardSigmoid takes alpha[0], beta[0]; Tanh nothing;
    ScaledTanh alpha[1], beta[1] (positionally it would read alpha[2], beta[2])."""
    names, alphas, betas = ["HardSigmoid", "Tanh", "ScaledTanh"], [0.3, 0.8, 0.5], [0.6, 1.5, 2.0]
    explicit = _ort_params(names, alphas, betas)
    assert explicit[2] == ("ScaledTanh", 0.8, 1.5)
    feeds = _lstm_problem(3, 4, seed=21)
    got = _ort_lstm_run(feeds, activations=names, activation_alpha=alphas, activation_beta=betas)
    acts = {k: (n.lower(), a, b) for k, (n, a, b) in zip("fgh", explicit)}
    _assert_lstm_close(got, _lstm_oracle_vs_feeds(feeds, **acts))
    positional = _positional_params(names, alphas, betas)
    assert positional != explicit
    assert _lstm_far(got, feeds, **{k: (n.lower(), a, b) for k, (n, a, b) in zip("fgh", positional)})


@needs_ort
def test_ort_lstm_float64_support_is_used_if_present():
    """Records the float64 finding: ORT 1.32 has no double LSTM; _ort_lstm_dtype switches the
    LSTM checks to float64 at 1e-9 if a later ORT gains one."""
    dt = _ort_lstm_dtype()
    feeds = _lstm_problem(2, 3, seed=4, steps=3)
    assert feeds["X"].dtype == dt
    assert _ort_lstm_run(feeds)[0].dtype == dt


# The shipped LSTM classifier (examples/train_default_model.py --cell lstm).

LSTM_DATA = Path(streamgru.__file__).resolve().parent / "data"


@needs_torch
def test_shipped_lstm_classifier_oracle_reproduces_torch_heldout_accuracy():
    """The shipped weights through the float64 oracle give torch's held-out accuracy at sequence
    end, which is also the one the training record states; every step's probabilities agree
    to float32 rounding."""
    from safetensors.numpy import load_file

    weights = load_file(LSTM_DATA / "basic_motions_lstm.safetensors")
    record = json.loads((LSTM_DATA / "basic_motions_lstm.json").read_text())
    with np.load(LSTM_DATA / "basic_motions_heldout.npz") as f:
        x, y = f["x"], f["y"]
    num_layers = sum(k.startswith("lstm.weight_ih_l") for k in weights)
    H = weights["lstm.weight_hh_l0"].shape[1]
    assert (num_layers, H) == (record["hyper_parameters"]["num_layers"],
                               record["hyper_parameters"]["hidden_size"])

    # torch, from the same weights
    lstm = torch.nn.LSTM(6, H, num_layers=num_layers, batch_first=True)
    head = torch.nn.Linear(H, 4)
    lstm.load_state_dict({k[5:]: torch.from_numpy(v) for k, v in weights.items()
                          if k.startswith("lstm.")})
    head.load_state_dict({k[7:]: torch.from_numpy(v) for k, v in weights.items()
                          if k.startswith("head.0.")})
    with torch.no_grad():
        prob_torch = torch.softmax(head(lstm(torch.from_numpy(x))[0]), dim=-1).numpy()
    acc_torch = float((prob_torch[:, -1].argmax(axis=-1) == y).mean())

    # the oracle, through the canonical reorder
    specs = [LSTMSpec(*(ifco_to_iofc(weights[f"lstm.{n}_l{k}"])
                        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
             for k in range(num_layers)]
    layers = specs + [DenseLayer(H, 4, weights["head.0.weight"], weights["head.0.bias"],
                                 activation="softmax")]
    s = np.zeros((len(x), sum(spec.state_size for spec in specs)))
    probs = []
    for t in range(x.shape[1]):
        p, s = oracle.lstm_step(layers, s, x[:, t])
        probs.append(p)
    prob_oracle = np.stack(probs, axis=1)
    acc_oracle = float((prob_oracle[:, -1].argmax(axis=-1) == y).mean())

    assert acc_oracle == acc_torch == record["heldout_accuracy_at_sequence_end"]["torch"]
    for k, acc in record["heldout_accuracy_after_k_steps_torch"].items():  # early steps differ
        t = int(k) - 1
        assert (prob_oracle[:, t].argmax(-1) == y).mean() == (prob_torch[:, t].argmax(-1) == y).mean() == acc
    assert record["heldout_accuracy_at_sequence_end"]["n"] == len(y) == 40
    np.testing.assert_allclose(prob_oracle, prob_torch, atol=1e-4)
    assert acc_torch >= 0.9  # a classifier worth shipping, not a chance-level one
