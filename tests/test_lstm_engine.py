"""LSTM layers through the engine: every kernel path, both dtypes, every option of the canonical
LSTM (peepholes, projection, clip, input_forget, activations), against the float64 oracle
(itself checked against torch.nn.LSTM and onnxruntime in tests/test_oracle.py) and against
torch.nn.LSTM directly."""

import numpy as np
import oracle
import pytest
from helpers import TOL, LSTMSpec, OracleStreams, check_against_oracle

from streamgru import DenseLayer, Engine, GRULayer, Model
from streamgru import engine as engine_mod
from streamgru.activations import LSTM_ACTIVATIONS

PARAMS = {"hardsigmoid": (0.3, 0.45), "leakyrelu": (0.05, 0.0), "affine": (0.7, 0.1),
          "thresholdedrelu": (0.2, 0.0), "scaledtanh": (0.9, 1.3), "elu": (0.8, 0.0)}


def act(name):
    return (name, *PARAMS.get(name, (0.0, 0.0)))


def lstm(I, H, seed, dtype=np.float64, **kwargs):
    return LSTMSpec.random(I, H, seed, **kwargs).layer(dtype)


def dense(rng, n_in, n_out, activation="identity"):
    return DenseLayer(n_in, n_out, rng.normal(size=(n_out, n_in)) * 0.4,
                      rng.normal(size=n_out) * 0.1, activation)


def gru(rng, I, H, lbr=1):
    s = 1 / np.sqrt(H)
    return GRULayer(I, H, rng.uniform(-s, s, (3 * H, I)), rng.uniform(-s, s, (3 * H, H)),
                    rng.uniform(-s, s, 3 * H), rng.uniform(-s, s, 3 * H), linear_before_reset=lbr)


def stack(variant):
    """A model per LSTM variant, each LSTM at another place of a stack (state offsets, the
    caller's output rows written by the last layer's cell, Dense layers on either side)."""
    rng = np.random.default_rng(7)
    if variant == "plain":  # PyTorch's LSTM: the fused float32 cell
        return Model([lstm(6, 16, 1), lstm(16, 12, 2), dense(rng, 12, 3, "softmax")])
    if variant == "peepholes":
        return Model([dense(rng, 6, 8, "relu"), lstm(8, 16, 3, peepholes=True), gru(rng, 16, 8),
                      dense(rng, 8, 3)])
    if variant == "projection":  # the projection is the T_RN product between the cell's halves
        return Model([lstm(6, 16, 4, proj_size=6), dense(rng, 6, 4, "tanh")])
    if variant == "options":  # every option at once; the model ends in an LSTM
        return Model([
            lstm(6, 12, 5, proj_size=5, peepholes=True, clip=1.5, input_forget=1,
                 f=act("hardsigmoid"), g="softsign", h=act("scaledtanh")),
            gru(rng, 5, 7, lbr=0),
            lstm(7, 6, 6, peepholes=True, f=act("leakyrelu"), g="relu", h="identity", scale=0.3),
        ])
    raise ValueError(variant)


VARIANTS = ["plain", "peepholes", "projection", "options"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("regime", ["serial", "parallel", "wide", "one"])
def test_every_step_path_matches_the_oracle(dtype, variant, regime, monkeypatch):
    check_against_oracle(stack(variant), dtype, steps=60, n=5, regime=regime,
                         monkeypatch=monkeypatch)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("wide", [False, True])
def test_run_matches_the_oracle_and_repeated_steps(dtype, variant, wide, monkeypatch):
    """run (the input products over all steps first, then the recurrence step by step; wide:
    every product spread over threads) from a nonzero state, against the oracle, and equal to
    the same events one call each."""
    if wide:
        monkeypatch.setattr(engine_mod, "RUN_WIDE_MIN_MACS", 1)
    model = stack(variant)
    rng = np.random.default_rng(11)
    s0 = rng.normal(size=model.state_size) * 0.5
    xs = rng.normal(size=(30, model.input_size)).astype(dtype)
    a = Engine(model, dtype=dtype, threads=2)
    b = Engine(model, dtype=dtype)
    a.open("k", s0)
    b.open("k", s0)
    ys = a.run("k", xs)
    ys_ref, s_ref = oracle.run(model, xs.astype(np.float64), s0.astype(dtype))
    np.testing.assert_allclose(ys, ys_ref, atol=TOL[dtype], rtol=0)
    np.testing.assert_allclose(a.state("k"), s_ref, atol=TOL[dtype], rtol=0)
    yb = np.concatenate([b.step(["k"], xs[t:t + 1]) for t in range(len(xs))])
    np.testing.assert_allclose(ys, yb, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("position", ["f", "g", "h"])
@pytest.mark.parametrize("name", sorted(LSTM_ACTIVATIONS))
def test_every_activation_in_every_position(name, position, dtype):
    # A gate activation above 1 (softplus, relu, ...) lets C grow step after step; float32 then
    # holds it to ~6e-8 of its size per operation, so the float32 check also allows 2e-6 of
    # the value (C reaches ~10 here). Small weights keep the rest of the recurrence bounded.
    kwargs = {position: act(name)}
    model = Model([lstm(4, 8, 20, scale=0.2, **kwargs), lstm(8, 5, 21, scale=0.2, **kwargs)])
    check_against_oracle(model, dtype, steps=40, rtol=2e-6 if dtype == "float32" else 0.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_clip_reaches_every_gate(dtype):
    """Large weights and a clip every gate pre-activation reaches: the clamp changes the
    result (checked against the same model without clip), and the engine follows the oracle."""
    spec = LSTMSpec.random(4, 8, 30, scale=6.0, peepholes=True, clip=0.6, f=act("hardsigmoid"),
                           g="relu", h="identity")
    model = Model([spec.layer()])
    check_against_oracle(model, dtype, steps=60)
    unclipped = Model([LSTMSpec.random(4, 8, 30, scale=6.0, peepholes=True, f=act("hardsigmoid"),
                                       g="relu", h="identity").layer()])
    x = np.ones((1, 4))
    s = np.full((1, 16), 0.5)
    assert np.abs(oracle.step(model, s, x)[0] - oracle.step(unclipped, s, x)[0]).max() > 0.1


@pytest.mark.parametrize("dtype,tdtype", [("float32", "float32"), ("float64", "float64")])
@pytest.mark.parametrize("proj_size", [0, 5])
def test_against_torch_nn_lstm(dtype, tdtype, proj_size):
    """torch.nn.LSTM itself (2 layers, with and without a projection), converted by from_torch,
    stepped 200 times for 4 streams from a nonzero (h, c) against torch's own sequence run."""
    torch = pytest.importorskip("torch")
    from converters import from_torch

    torch.manual_seed(0)
    I, H, L, n, T = 7, 24, 2, 4, 200
    net = torch.nn.LSTM(I, H, num_layers=L, proj_size=proj_size).to(getattr(torch, tdtype))
    model = from_torch(net, dtype=dtype)
    P = proj_size or H
    rng = np.random.default_rng(1)
    h0 = rng.normal(size=(L, n, P)) * 0.5
    c0 = rng.normal(size=(L, n, H)) * 0.5
    xs = rng.normal(size=(T, n, I))
    with torch.no_grad():
        y_t, _ = net(torch.tensor(xs, dtype=getattr(torch, tdtype)),
                     (torch.tensor(h0, dtype=getattr(torch, tdtype)),
                      torch.tensor(c0, dtype=getattr(torch, tdtype))))
    y_t = y_t.double().numpy()
    eng = Engine(model, dtype=dtype)
    for i in range(n):  # the engine's state: each layer's h then c, layers in order
        eng.set_state(i, np.concatenate([np.concatenate([h0[k, i], c0[k, i]]) for k in range(L)]))
    tol = 2e-5 if dtype == "float32" else 1e-10
    for t in range(T):
        y = eng.step(list(range(n)), xs[t].astype(dtype))
        np.testing.assert_allclose(y, y_t[t], atol=tol, rtol=0)


@pytest.mark.parametrize("proj_size", [0, 6])
@pytest.mark.parametrize("regime", ["serial", "parallel", "wide", "one"])
def test_fused_standard_cell_and_general_path_agree(proj_size, regime, monkeypatch):
    """The float32 sigmoid/tanh/tanh LSTM cell runs fused; a clip no value reaches sends the
    same layer down the general per-phase path. LLVM contracts one fused loop differently from
    several (kernels._lstm_std32), so the two agree within float32 rounding, not bit for bit;
    both follow the oracle."""
    if regime == "parallel":
        monkeypatch.setattr(engine_mod, "PARALLEL_MIN_ROWS", 1)
    elif regime == "wide":
        monkeypatch.setattr(engine_mod, "WIDE_MIN_MACS", 0)
    rng = np.random.default_rng(40)
    spec = LSTMSpec.random(7, 48, 41, proj_size=proj_size)
    head = dense(rng, proj_size or 48, 5)
    fused = Model([spec.layer(np.float32), head])
    general = Model([LSTMSpec(**{**spec.__dict__, "clip": 1e30}).layer(np.float32), head])
    ef, eg = Engine(fused, dtype="float32"), Engine(general, dtype="float32")
    ref = OracleStreams(fused)
    for n in (1, 5, 70):
        keys = list(range(n))
        for _ in range(3):
            x = rng.normal(size=(n, 7)).astype(np.float32)
            if regime == "one":
                yf = np.concatenate([ef.step([k], x[k:k + 1]) for k in keys])
                yg = np.concatenate([eg.step([k], x[k:k + 1]) for k in keys])
            else:
                yf, yg = ef.step(keys, x), eg.step(keys, x)
            y_ref = ref.step(keys, x.astype(np.float64))
            np.testing.assert_allclose(yf, yg, atol=1e-6, rtol=0)
            np.testing.assert_allclose(yf, y_ref, atol=TOL["float32"], rtol=0)
            np.testing.assert_allclose(yg, y_ref, atol=TOL["float32"], rtol=0)
    for k in range(70):
        np.testing.assert_allclose(ef.state(k), eg.state(k), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("regime", ["serial", "parallel", "wide"])
def test_duplicate_keys_equal_separate_calls_and_the_one_event_path(dtype, regime, monkeypatch):
    """A key listed several times in one call is stepped once per occurrence, in order: bit
    for bit what separate one-event calls give (the one-event kernel), states included."""
    if regime == "parallel":
        monkeypatch.setattr(engine_mod, "PARALLEL_MIN_ROWS", 1)
    elif regime == "wide":
        monkeypatch.setattr(engine_mod, "WIDE_MIN_MACS", 0)
    for variant in VARIANTS:
        model = stack(variant)
        a, b = Engine(model, dtype=dtype), Engine(model, dtype=dtype)
        rng = np.random.default_rng(3)
        keys = [3, 1, 3, 3, 2, 1, 0, 3] * 9
        for _ in range(2):
            x = rng.normal(size=(len(keys), model.input_size)).astype(dtype)
            y = a.step(keys, x)
            y_sep = np.concatenate([b.step([k], x[i:i + 1]) for i, k in enumerate(keys)])
            np.testing.assert_array_equal(y, y_sep)
        for k in range(4):
            np.testing.assert_array_equal(a.state(k), b.state(k))


def test_state_is_h_then_c_per_layer_in_layer_order():
    """set_state/open/state use the flat concatenation (each LSTM layer's h, then its C, layers
    in order): a state set through the engine steps exactly as the oracle steps it."""
    model = stack("peepholes")  # Dense, LSTM (16: h 16, C 16), GRU (8), Dense
    assert [s.stop - s.start for s in model.state_slices] == [32, 8]
    eng = Engine(model, dtype="float64")
    rng = np.random.default_rng(5)
    s0 = rng.normal(size=model.state_size)
    eng.open("a", s0)
    x = rng.normal(size=(1, model.input_size))
    y, s1 = oracle.step(model, s0[None], x)
    np.testing.assert_allclose(eng.step(["a"], x), y, atol=1e-12, rtol=0)
    np.testing.assert_allclose(eng.state("a"), s1[0], atol=1e-12, rtol=0)
    c = s0.copy()
    c[16:32] += 1.0  # the cell state alone changes the output
    eng.set_state("a", c)
    assert np.abs(eng.step(["a"], x) - y).max() > 1e-3


@pytest.mark.parametrize("policy", ["skip", "zero", "last"])
@pytest.mark.parametrize("variant", ["projection", "options"])
def test_missing_values_with_an_lstm_last_recurrent_layer(policy, variant):
    """"skip" outputs the layers after the last recurrent layer applied to its held h: for an
    LSTM the first output_size values of its state, never its C."""
    model = stack(variant)
    eng = Engine(model, dtype="float64", missing=policy)
    ref = oracle.MissingStreams(model, policy)
    rng = np.random.default_rng(8)
    for _ in range(12):
        keys = list(rng.integers(0, 4, size=5))
        x = rng.normal(size=(5, model.input_size))
        x[rng.random(x.shape) < 0.2] = np.nan
        np.testing.assert_allclose(eng.step(keys, x), ref.feed_rows(keys, x), atol=1e-9, rtol=0)
    xs = rng.normal(size=(9, model.input_size))
    xs[rng.random(xs.shape) < 0.3] = np.nan
    np.testing.assert_allclose(eng.run(9, xs), ref.feed_rows([9] * 9, xs), atol=1e-9, rtol=0)
    for k in list(eng.keys()):
        np.testing.assert_allclose(eng.state(k), ref.state(k), atol=1e-9, rtol=0)


def test_overflow_in_the_cell_state_is_refused_and_changes_nothing():
    """An identity cell-output activation with huge weights overflows C (float32): the call is
    refused naming the key, every state as it was, the other streams still step."""
    from streamgru import NonFiniteError

    spec = LSTMSpec.random(2, 4, 50, g="identity", h="identity", f=act("affine"))
    model = Model([spec.layer()])
    eng = Engine(model, dtype="float32")
    eng.step([1, 2], np.ones((2, 2), np.float32))
    before = {k: eng.state(k) for k in (1, 2)}
    x = np.array([[1e30, 1e30], [0.5, 0.5]], np.float32)
    with pytest.raises(NonFiniteError) as err:
        eng.step([1, 2], x)
    assert err.value.keys == [1]
    for k in (1, 2):
        np.testing.assert_array_equal(eng.state(k), before[k])
    y = eng.step([2], x[1:])
    assert np.isfinite(y).all()


def test_eviction_hands_over_the_whole_state_and_snapshots_round_trip(tmp_path):
    """on_evict receives h and C; a snapshot of an LSTM engine restores every stream bit for
    bit, and the restored engine steps exactly as the original."""
    model = stack("options")
    evicted = {}
    eng = Engine(model, max_streams=3, on_evict=evicted.__setitem__)
    ref = OracleStreams(model)
    rng = np.random.default_rng(9)
    for k in range(3):
        x = rng.normal(size=(1, model.input_size)).astype(np.float32)
        eng.step([k], x)
        ref.step([k], x)
    eng.step([3], np.zeros((1, model.input_size), np.float32))  # evicts 0, the least recent
    assert list(evicted) == [0]
    np.testing.assert_allclose(evicted[0], ref.state(0), atol=1e-5, rtol=0)
    assert evicted[0].shape == (model.state_size,)
    eng.save_state(tmp_path / "s.sgst")
    other = Engine(model)
    other.load_state(tmp_path / "s.sgst")
    x = rng.normal(size=(3, model.input_size)).astype(np.float32)
    np.testing.assert_array_equal(other.step([1, 2, 3], x), eng.step([1, 2, 3], x))
