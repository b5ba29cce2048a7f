"""Kernels through the engine against the float64 oracle and torch.nn.GRU: every activation,
clip, both linear_before_reset variants, multi-layer stacks with dense layers, 200 steps."""

import dataclasses

import numpy as np
import oracle
import pytest
from helpers import TOL, LSTMSpec, check_against_oracle, torch_to_canonical

from streamgru import DenseLayer, Engine, GRULayer, GRUModel
from streamgru import engine as engine_mod
from streamgru import kernels as K
from streamgru.activations import GRU_ACTIVATIONS

PARAMS = {"hardsigmoid": (0.3, 0.45), "leakyrelu": (0.05, None), "affine": (0.7, 0.1),
          "thresholdedrelu": (0.2, None), "scaledtanh": (0.9, 1.3), "elu": (0.8, None)}


def spec(name):
    a, b = PARAMS.get(name, (None, None))
    return (name, a, b) if b is not None else ((name, a) if a is not None else name)


def gru(rng, I, H, lbr, f="sigmoid", g="tanh", clip=None, scale=None):
    s = scale if scale is not None else 1 / np.sqrt(H)
    return GRULayer(I, H, rng.uniform(-s, s, (3 * H, I)), rng.uniform(-s, s, (3 * H, H)),
                    rng.uniform(-s, s, 3 * H), rng.uniform(-s, s, 3 * H),
                    linear_before_reset=lbr, f=spec(f), g=spec(g), clip=clip)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("regime", ["serial", "parallel", "wide", "one"])
def test_multilayer_with_dense_before_and_after(dtype, lbr, regime, monkeypatch):
    rng = np.random.default_rng(lbr)
    model = GRUModel([
        DenseLayer(5, 12, rng.normal(size=(12, 5)) * 0.4, rng.normal(size=12) * 0.1, "relu"),
        gru(rng, 12, 16, lbr),
        gru(rng, 16, 9, lbr),
        DenseLayer(9, 7, rng.normal(size=(7, 9)) * 0.4, rng.normal(size=7) * 0.1, "tanh"),
        DenseLayer(7, 3, rng.normal(size=(3, 7)) * 0.4, None, "softmax"),
    ])
    check_against_oracle(model, dtype, regime=regime, monkeypatch=monkeypatch)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("act", sorted(GRU_ACTIVATIONS))
def test_every_activation_as_gate_and_candidate(act, lbr, dtype):
    rng = np.random.default_rng(sorted(GRU_ACTIVATIONS).index(act))
    # Unbounded activations (softplus as a gate gives z > 1) can make h grow without bound, and
    # then float32 rounding, not the engine, decides the error; small weights keep h bounded.
    layer_f = gru(rng, 4, 8, lbr, f=act, g="tanh", scale=0.15)
    layer_g = gru(rng, 8, 8, lbr, f="sigmoid", g=act, scale=0.15)
    check_against_oracle(GRUModel([layer_f, layer_g]), dtype, steps=100)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lbr", [0, 1])
def test_clip(dtype, lbr):
    rng = np.random.default_rng(3)
    layer = gru(rng, 4, 8, lbr, f="hardsigmoid", g="relu", clip=0.7, scale=2.0)
    check_against_oracle(GRUModel([layer]), dtype, steps=100)


@pytest.mark.parametrize("act", ["identity", "relu", "tanh", "sigmoid", "softmax", "elu",
                                 "softplus", "leakyrelu", "hardsigmoid"])
def test_dense_activations(act):
    rng = np.random.default_rng(4)
    model = GRUModel([gru(rng, 3, 6, 1),
                      DenseLayer(6, 5, rng.normal(size=(5, 6)), rng.normal(size=5), spec(act))])
    check_against_oracle(model, "float64", steps=20)
    check_against_oracle(model, "float32", steps=20)


@pytest.mark.nojit
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_small_model_every_path_nojit_friendly(dtype, monkeypatch):
    """Small enough to run with NUMBA_DISABLE_JIT=1 (covering the kernel bodies as Python)."""
    rng = np.random.default_rng(5)
    model = GRUModel([DenseLayer(3, 4, rng.normal(size=(4, 3)), None, "softmax"),
                      gru(rng, 4, 5, 0, f="hardsigmoid", g="softsign", clip=1.5),
                      gru(rng, 5, 3, 1, f=("leakyrelu", 0.1), g=("scaledtanh", 0.9, 1.1)),
                      DenseLayer(3, 2, rng.normal(size=(2, 3)), None, "elu")])
    check_against_oracle(model, dtype, steps=6, n=5)
    check_against_oracle(model, dtype, steps=3, n=5, regime="parallel", monkeypatch=monkeypatch)
    check_against_oracle(model, dtype, steps=3, n=5, regime="wide", monkeypatch=monkeypatch)
    eng = Engine(model, dtype=dtype)
    xs = rng.normal(size=(6, 3))
    ys_ref, s_ref = oracle.run(model, xs.astype(dtype))
    np.testing.assert_allclose(eng.run("k", xs), ys_ref, atol=TOL[dtype], rtol=0)
    np.testing.assert_allclose(eng.state("k"), s_ref, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype,tdtype", [("float32", "float32"), ("float64", "float64")])
def test_against_torch_nn_gru(dtype, tdtype):
    """The PyTorch-equivalent configuration against torch.nn.GRU itself (2 layers, 200 steps)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    I, H, L, n, T = 7, 24, 2, 4, 200
    net = torch.nn.GRU(I, H, num_layers=L).to(getattr(torch, tdtype))
    sd = {k: v.detach().double().numpy() for k, v in net.state_dict().items()}

    layers = [GRULayer(I if k == 0 else H, H, torch_to_canonical(sd[f"weight_ih_l{k}"]),
                       torch_to_canonical(sd[f"weight_hh_l{k}"]), torch_to_canonical(sd[f"bias_ih_l{k}"]),
                       torch_to_canonical(sd[f"bias_hh_l{k}"]), linear_before_reset=1) for k in range(L)]
    model = GRUModel(layers)
    eng = Engine(model, dtype=dtype)
    rng = np.random.default_rng(1)
    h0 = rng.normal(size=(L, n, H)) * 0.5
    for i in range(n):
        eng.set_state(i, h0[:, i, :])
    xs = rng.normal(size=(T, n, I))
    with torch.no_grad():
        y_t, h_t = net(torch.tensor(xs, dtype=getattr(torch, tdtype)),
                       torch.tensor(h0, dtype=getattr(torch, tdtype)))
    ys = np.stack([eng.step(list(range(n)), xs[t]) for t in range(T)])
    np.testing.assert_allclose(ys, y_t.double().numpy(), atol=TOL[dtype], rtol=0)
    for i in range(n):
        np.testing.assert_allclose(eng.state(i), h_t[:, i, :].double().numpy().ravel(),
                                   atol=TOL[dtype], rtol=0)


def test_float32_tanh_approximation_error():
    """The float32 tanh the kernels use, over its whole range, against libm in float64."""
    from numba import njit

    from streamgru.kernels import _act

    @njit(cache=False)
    def act(out, kind):  # _act is called only from compiled code
        _act(out, 0, 0, out.shape[1], kind, np.float32(0), np.float32(0), np.float32(0), True)

    v = np.linspace(-12, 12, 200_001).astype(np.float32)
    ref = np.tanh(v.astype(np.float64))
    out = v.copy()[None]
    act(out, 2)
    assert np.abs(out[0] - ref).max() < 5e-7
    out = v.copy()[None]
    act(out, 1)
    assert np.abs(out[0] - 1 / (1 + np.exp(-v.astype(np.float64)))).max() < 5e-7


@pytest.mark.nojit
def test_nojit_run_really_runs_python_kernels():
    """Under NUMBA_DISABLE_JIT=1 the kernels must be plain Python (so coverage sees them)."""
    import os

    from streamgru import kernels

    if os.environ.get("NUMBA_DISABLE_JIT") != "1":
        pytest.skip("only meaningful in the NUMBA_DISABLE_JIT=1 pass of `make test`")
    assert not hasattr(kernels.step_serial, "signatures")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lbr", [0, 1])
def test_run_with_recurrent_products_spread_over_threads(dtype, lbr, monkeypatch):
    """run() on the panel-parallel sequence kernel (forced for a small model) against the oracle
    and against the serial sequence kernel."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    monkeypatch.setattr(engine_mod, "RUN_WIDE_MIN_MACS", 1)
    rng = np.random.default_rng(20 + lbr)
    model = GRUModel([DenseLayer(5, 40, rng.normal(size=(40, 5)) * 0.3, None, "tanh"),
                      gru(rng, 40, 70, lbr), gru(rng, 70, 33, lbr),
                      DenseLayer(33, 3, rng.normal(size=(3, 33)), None, "softmax")])
    s0 = rng.normal(size=model.state_size) * 0.4
    xs = rng.normal(size=(30, 5))
    wide = Engine(model, dtype=dtype, threads=2)
    wide.open("k", s0)
    ys = wide.run("k", xs)
    ys_ref, s_ref = oracle.run(model, xs.astype(dtype), s0.astype(dtype))
    np.testing.assert_allclose(ys, ys_ref, atol=TOL[dtype], rtol=0)
    np.testing.assert_allclose(wide.state("k"), s_ref, atol=TOL[dtype], rtol=0)
    serial = Engine(model, dtype=dtype, threads=1)
    serial.open("k", s0)
    np.testing.assert_array_equal(serial.run("k", xs), ys)  # same tiles, same sums: identical


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("regime", ["serial", "parallel", "wide"])
def test_gru_last_layer_writes_outputs_directly(dtype, lbr, regime, monkeypatch):
    """A model ending in a GRU layer, whose cells write the caller's output rows themselves
    (no workspace copy): against the oracle, and a batch with repeated keys equal to separate
    calls bit for bit."""
    rng = np.random.default_rng(30 + lbr)
    model = GRUModel([gru(rng, 6, 40, lbr), gru(rng, 40, 24, lbr)])
    check_against_oracle(model, dtype, steps=20, n=70, regime=regime, monkeypatch=monkeypatch)
    keys = [3, 1, 3, 3, 2, 1, 0, 3] * 9
    x = rng.normal(size=(len(keys), 6)).astype(dtype)
    a, b = Engine(model, dtype=dtype), Engine(model, dtype=dtype)
    y = a.step(keys, x)
    y_sep = np.concatenate([b.step([k], x[i:i + 1]) for i, k in enumerate(keys)])
    np.testing.assert_array_equal(y, y_sep)
    for k in range(4):
        np.testing.assert_array_equal(a.state(k), b.state(k))


@pytest.mark.parametrize("regime", ["serial", "parallel", "wide"])
def test_fused_standard_cell_equals_general_path_bit_for_bit(regime, monkeypatch):
    """The float32 sigmoid/tanh cell runs fused; a clip no value reaches sends the same layer
    down the general per-phase path, which must give exactly the same bits."""
    if regime == "parallel":
        monkeypatch.setattr(engine_mod, "PARALLEL_MIN_ROWS", 1)
    elif regime == "wide":
        monkeypatch.setattr(engine_mod, "WIDE_MIN_MACS", 0)
    rng = np.random.default_rng(40)
    fused = GRUModel([gru(rng, 7, 48, 1), DenseLayer(48, 5, rng.normal(size=(5, 48)), None,
                                                     "identity")])
    layer = fused.layers[0]
    general = GRUModel([GRULayer(7, 48, layer.W, layer.R, layer.Wb, layer.Rb,
                                 linear_before_reset=1, clip=1e30), fused.layers[1]])
    ef, eg = Engine(fused, dtype="float32"), Engine(general, dtype="float32")
    for n in (1, 5, 70):
        keys = list(range(n))
        for _ in range(3):
            x = rng.normal(size=(n, 7)).astype(np.float32)
            np.testing.assert_array_equal(ef.step(keys, x), eg.step(keys, x))
    xs = rng.normal(size=(9, 7)).astype(np.float32)
    np.testing.assert_array_equal(ef.run(0, xs), eg.run(0, xs))
    np.testing.assert_array_equal(ef.state(0), eg.state(0))


def test_import_without_a_writable_cache_directory_warns_and_compiles():
    """With no writable cache directory anywhere, ``cache=True`` made Numba raise at import;
    the kernels now compile in each process instead, after a warning that names the fix. No
    kernel compiles here: the subprocess only imports."""
    import os
    import subprocess
    import sys

    from numba import config

    if not hasattr(config, "CACHE_LOCATOR_CLASSES"):
        pytest.skip("this Numba cannot restrict its cache locators")
    # Only the NUMBA_CACHE_DIR locator, pointed at a path no one can create.
    env = dict(os.environ, NUMBA_CACHE_LOCATOR_CLASSES="UserProvidedCacheLocator",
               NUMBA_CACHE_DIR=os.path.join(os.devnull, "cache"))
    env.pop("NUMBA_DISABLE_JIT", None)
    env.pop("STREAMGRU_TILE", None)
    r = subprocess.run([sys.executable, "-c", "import streamgru.kernels as K; print(K.cache_dir())"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "None"
    assert "no writable cache directory" in r.stderr and "NUMBA_CACHE_DIR" in r.stderr


@pytest.mark.nojit
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_kernel_on_packed_arrays_same_bits_as_the_oracle(dtype):
    """The kernels called directly on one packed model (Dense, GRU with linear_before_reset 0
    and 1, an LSTM with peepholes and a projection, a standard LSTM, Dense): the same events
    through step_serial, step_parallel, step_wide, step_one (both weight directions),
    run_sequence (both) and run_sequence_wide give bit-identical outputs and states (one layer
    loop, the same tiles and cells), and match the oracle. The argument types are the
    engine's, so nothing compiles that the other tests do not."""
    from streamgru.packing import pack

    rng = np.random.default_rng(50)
    model = GRUModel([DenseLayer(4, 10, rng.normal(size=(10, 4)) * 0.4, None, "relu"),
                      gru(rng, 10, 20, 0), gru(rng, 20, 12, 1),
                      LSTMSpec.random(12, 10, 51, proj_size=6, peepholes=True).layer(),
                      LSTMSpec.random(6, 12, 52).layer(),
                      DenseLayer(12, 3, rng.normal(size=(3, 12)), None, "softmax")])
    p = pack(model, dtype)
    assert (p.dtype, p.weights_dtype) == (np.dtype(dtype),) * 2
    n, steps, cap = 5, 4, 8
    s0 = (rng.normal(size=(n, model.state_size)) * 0.5).astype(dtype)
    xs = rng.normal(size=(steps, n, model.input_size)).astype(dtype)
    ys_ref, ref = [], s0.astype(np.float64)
    for t in range(steps):
        y, ref = oracle.step(model, ref, xs[t].astype(np.float64))
        ys_ref.append(y)
    ys_ref = np.stack(ys_ref)

    def fresh():
        state = np.zeros((cap, model.state_size), dtype)
        state[2:2 + n] = s0  # streams in rows 2..6, as an engine's slots would be
        return state

    results = {}
    for name in ("step_serial", "step_parallel", "step_wide"):
        state, slots = fresh(), np.arange(2, 2 + n, dtype=np.int64)
        scratch = np.zeros((n, p.scratch_width), dtype)
        iwork, mark = np.zeros(4 * n + 1, np.int64), np.zeros(cap, np.int64)
        ys = np.zeros((steps, n, model.output_size), dtype)
        for t in range(steps):
            assert getattr(p.kernels, name)(p.params, p.table, p.fp, state, slots, xs[t], ys[t],
                                            scratch, iwork, mark, True) == -1
        results[name] = ys, state
    for flip in (0, 1):
        state = fresh()
        scratch = np.zeros((2, p.scratch_width), dtype)
        ys = np.zeros((steps, n, model.output_size), dtype)
        for t in range(steps):
            for i in range(n):
                out = np.zeros((1, model.output_size), dtype)
                assert p.kernels.step_one(p.params, p.table, p.fp, state, 2 + i, xs[t, i:i + 1],
                                          out, scratch, True, flip) == -1
                ys[t, i] = out[0]
        results[f"step_one flip={flip}"] = ys, state
    for name, extra in (("run_sequence", (0,)), ("run_sequence", (1,)),
                        ("run_sequence_wide", (2,))):
        state = fresh()
        scratch = np.zeros((steps + 1, p.scratch_width), dtype)
        ys = np.zeros((steps, n, model.output_size), dtype)
        for i in range(n):
            seq = np.ascontiguousarray(xs[:, i])
            out = np.zeros((steps, model.output_size), dtype)
            assert getattr(p.kernels, name)(p.params, p.table, p.fp, state, 2 + i, seq, out,
                                            scratch, True, *extra) == -1
            ys[:, i] = out
        results[f"{name} {extra}"] = ys, state
    ys0, state0 = results.pop("step_serial")
    np.testing.assert_allclose(ys0, ys_ref, atol=TOL[dtype], rtol=0)
    np.testing.assert_allclose(state0[2:2 + n], ref, atol=TOL[dtype], rtol=0)
    assert not state0[:2].any() and not state0[2 + n:].any()
    # Compiled, every path runs the same tiles and cells: the same bits. As Python (NUMBA_DISABLE_JIT)
    # the products are numpy's, whose rounding depends on the row count.
    jit = hasattr(p.kernels.step_serial, "signatures")
    for name, (ys, state) in results.items():
        for a, b in ((ys, ys0), (state, state0)):
            if jit:
                np.testing.assert_array_equal(a, b, err_msg=name)
            else:
                np.testing.assert_allclose(a, b, atol=TOL[dtype], rtol=0, err_msg=name)


def _every_recurrence_mode(rng, dtype):
    """A model with a layer of each way run_sequence_wide shares a step's recurrent product,
    packed, and each layer's recurrent multiply-adds (padded panels counted, as the kernel
    counts them)."""
    from streamgru.kernels import RUN_TEAM_MIN_MACS, RUN_WIDE_MIN_MACS, panel_width
    from streamgru.packing import pack

    model = GRUModel([DenseLayer(6, 16, rng.normal(size=(16, 6)) * 0.4, None, "relu"),
                      gru(rng, 16, 128, 1),  # a team
                      gru(rng, 128, 224, 0),  # a region per step: R_n comes between
                      LSTMSpec.random(224, 40, 61, proj_size=24).layer(),  # the calling thread
                      LSTMSpec.random(24, 96, 62).layer(),  # a team
                      DenseLayer(96, 5, rng.normal(size=(5, 96)) * 0.3, None, "softmax")])
    p = pack(model, dtype)
    nr = panel_width(dtype)
    t = p.table
    rmacs = [int(t[l, K.T_OUT] * t[l, K.T_NPR] + t[l, K.T_HID] * t[l, K.T_NPRN]) * nr
             for l in range(len(model.layers))]
    assert rmacs[1] >= RUN_TEAM_MIN_MACS and t[1, K.T_NPRN] == 0
    assert rmacs[2] >= RUN_WIDE_MIN_MACS and t[2, K.T_NPRN] > 0
    assert 0 < rmacs[3] < RUN_TEAM_MIN_MACS
    assert rmacs[4] >= RUN_TEAM_MIN_MACS and t[4, K.T_NPRN] == 0
    return model, p, rmacs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_run_split_macs_counts_only_what_run_sequence_wide_spreads(dtype):
    """The engine's rule for run() on threads (engine.RUN_SPLIT_MIN_MACS) weighs the
    multiply-adds run_sequence_wide spreads: every layer's input side (Dense products included),
    and the recurrent products of the layers whose steps it shares (the teams, the region per
    step), not the projected LSTM's, which the calling thread computes either way."""
    from streamgru.kernels import panel_width, run_split_macs

    model, p, rmacs = _every_recurrence_mode(np.random.default_rng(60), dtype)
    nr = panel_width(dtype)
    t = p.table
    # each layer's outputs of its input side, padded to whole panels
    outs = [16, 3 * 128, 3 * 224, 4 * 40, 4 * 96, 5]
    assert [int(t[l, K.T_NPW]) for l in range(6)] == [-(-o // nr) for o in outs]
    input_side = sum(layer.input_size * -(-o // nr) * nr for layer, o in zip(model.layers, outs))
    shared = rmacs[1] + rmacs[2] + rmacs[4]
    assert run_split_macs(t, np.dtype(dtype).itemsize) == input_side + shared


def test_run_on_threads_spreads_a_sequence_only_when_the_split_pays(monkeypatch):
    """run() on 2 threads: a small LSTM's 100 steps (I=16, H=64: 0.41M multiply-adds to spread,
    its recurrent product stays on the calling thread) take the serial kernel, as on one
    thread; the same steps at I=128, H=128 (a team) take run_sequence_wide, and so does the
    small model's sequence once it is long enough."""
    calls = []

    def spy(eng):
        ks = eng._packed.kernels

        def wrap(name):
            f = getattr(ks, name)
            return lambda *a: (calls.append(name), f(*a))[1]

        new = ks._replace(run_sequence=wrap("run_sequence"),
                          run_sequence_wide=wrap("run_sequence_wide"))
        monkeypatch.setattr(eng, "_packed", dataclasses.replace(eng._packed, kernels=new))

    rng = np.random.default_rng(3)
    for I, H, T, kernel in ((16, 64, 100, "run_sequence"), (128, 128, 100, "run_sequence_wide"),
                            (16, 64, 400, "run_sequence_wide")):
        model = GRUModel([LSTMSpec.random(I, H, 5).layer()])
        eng = Engine(model, threads=2)
        eng.open("k")
        spy(eng)
        calls.clear()
        xs = rng.normal(size=(T, I)).astype(np.float32)
        ys = eng.run("k", xs)
        assert calls == [kernel], (I, H, T)
        ref, state = [], np.zeros((1, model.state_size))
        for i in range(T):
            y, state = oracle.step(model, state, xs[i:i + 1].astype(np.float64))
            ref.append(y[0])
        np.testing.assert_allclose(ys, np.stack(ref), atol=TOL["float32"], rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_run_sequence_wide_every_recurrence_mode_same_bits_as_serial(dtype):
    """run_sequence_wide picks, per layer, how each step's recurrent product is shared: a team
    of ``workers`` threads in one parallel region for the whole sequence (K.RUN_TEAM_MIN_MACS;
    layers without a product between their cell's halves), a parallel region per step (layers
    with one, from K.RUN_WIDE_MIN_MACS), or the calling thread. One model holds a layer of
    each, and every worker count (1: no team; more workers than threads: a worker that starts
    late finds the steps done by the others) gives the bits of run_sequence, and the oracle's
    values."""
    rng = np.random.default_rng(60)
    model, p, rmacs = _every_recurrence_mode(rng, dtype)
    steps = 12
    s0 = (rng.normal(size=model.state_size) * 0.5).astype(dtype)
    xs = rng.normal(size=(steps, model.input_size)).astype(dtype)
    ys_ref, ref = [], s0[None].astype(np.float64)
    for i in range(steps):
        y, ref = oracle.step(model, ref, xs[i:i + 1].astype(np.float64))
        ys_ref.append(y[0])

    def run(kernel, *extra):
        state = np.zeros((3, model.state_size), dtype)
        state[1] = s0
        scratch = np.zeros((steps + 1, p.scratch_width), dtype)
        out = np.zeros((steps, model.output_size), dtype)
        assert kernel(p.params, p.table, p.fp, state, 1, xs, out, scratch, True, *extra) == -1
        assert not state[0].any() and not state[2].any()
        return out, state[1]

    ys0, h0 = run(p.kernels.run_sequence, 0)
    np.testing.assert_allclose(ys0, np.stack(ys_ref), atol=TOL[dtype], rtol=0)
    np.testing.assert_allclose(h0, ref[0], atol=TOL[dtype], rtol=0)
    jit = hasattr(p.kernels.run_sequence, "signatures")
    for workers in (1, 2, 3, 5):
        ys, h = run(p.kernels.run_sequence_wide, workers)
        for a, b in ((ys, ys0), (h, h0)):
            if jit:
                np.testing.assert_array_equal(a, b, err_msg=f"workers={workers}")
            else:
                np.testing.assert_allclose(a, b, atol=TOL[dtype], rtol=0)


def test_pack_carries_both_dtypes_and_refuses_what_the_kernels_cannot_run():
    """Compact weights (float16 as its bits, int8) pack only for float32 arithmetic; a float64
    engine keeps float64 weights. Anything else is refused naming the argument, never cast."""
    from streamgru.packing import pack

    model = GRUModel.random(3, 8)
    p = pack(model, "float64", weights="float64")
    assert p.params.dtype == p.weights_dtype == p.fp.dtype == p.dtype == np.float64
    assert p.weights == "float64"
    for form, stored in (("float32", np.float32), ("float16", np.uint16), ("int8", np.int8)):
        p = pack(model, "float32", weights=form)
        assert (p.weights, p.params.dtype, p.fp.dtype) == (form, stored, np.float32)
    for bad in ("float16", "float32", "int8"):
        with pytest.raises(ValueError, match=rf'weights: expected "float64" \(or None\) for a '
                                             rf"float64 engine, got '{bad}'"):
            pack(model, "float64", weights=bad)
    with pytest.raises(ValueError, match=r"weights: expected one of 'float32', 'float16', 'int8', "
                                         r"got 'int4'"):
        pack(model, "float32", weights="int4")
    with pytest.raises(ValueError, match="dtype: expected float32 or float64, got int32"):
        pack(model, "int32")


def test_activation_ids_have_one_source():
    """Each activation's kernel id is the named constant of streamgru.activations, and the
    kernels read those very constants (no second table of integers to keep in sync)."""
    from streamgru import activations as A

    ids = {name: A.ACTIVATIONS[name][0] for name in A.ACTIVATIONS}
    assert len(set(ids.values())) == len(ids)
    for name, i in ids.items():
        const = "ACT_" + name.upper()
        assert getattr(A, const) == i
        assert getattr(K, const) is getattr(A, const)
    assert set(getattr(K._act, "py_func", K._act).__code__.co_names) >= {"ACT_" + n.upper() for n in ids}


@pytest.mark.skipif(__import__("os").environ.get("NUMBA_DISABLE_JIT") == "1",
                    reason="about compiled kernels")
def test_serial_and_parallel_variants_keep_separate_cache_entries():
    """The layer loops are compiled twice from one body (parallel=False and True); Numba keys
    its on-disk cache index by qualified name and line, not by the parallel flag, so each
    variant must have its own name and index file, or one would load the other's code. The
    helpers only kernels call (kernels._inner) are not cached at all: each kernel's entry
    holds their code."""
    from numba.core.caching import NullCache

    if not K._JIT["cache"]:
        pytest.skip("kernels not cached in this process")
    pairs = [(K._step_block, K._step_block_wide), (K.run_sequence, K._run_sequence_wide)]
    for serial, wide in pairs:
        assert not serial.targetoptions.get("parallel") and wide.targetoptions["parallel"]
        assert serial.__qualname__ != wide.__qualname__
        cached = [d for d in (serial, wide) if not isinstance(d._cache, NullCache)]
        assert all(not isinstance(d, K._KernelOnly) for d in cached)
        assert len({d._cache._cache_file._index_name for d in cached}) == len(cached)
    assert isinstance(K._step_block._cache, NullCache) and isinstance(K._gemv._cache, NullCache)
    assert not isinstance(K.run_sequence._cache, NullCache)


def _zeros_layers():
    from streamgru.model import DenseLayer, GRULayer, LSTMLayer

    def gru(I, H, lbr=1, **kw):
        return GRULayer(I, H, np.zeros((3 * H, I)), np.zeros((3 * H, H)),
                        linear_before_reset=lbr, **kw)

    def lstm(I, H, **kw):
        P = np.zeros(3 * H) if kw.pop("peepholes", False) else None
        out = kw.get("proj_size", 0) or H
        return LSTMLayer(I, H, np.zeros((4 * H, I)), np.zeros((4 * H, out)), P=P, **kw)

    def dense(I, O, act):
        return DenseLayer(I, O, np.zeros((O, I)), np.zeros(O), act)

    return gru, lstm, dense


def test_a_models_cell_set_names_exactly_the_cells_its_layers_take():
    """kernels.cells_of: the standard float32 cells (sigmoid gates, tanh, no clip; an LSTM
    without peepholes or input_forget) have a bit each; any other GRU or LSTM cell and every
    float64 model take the general paths; a Dense layer the common or the full activations.
    The engine's one-event kernel is the smallest of the standard GRU or LSTM sets (without
    Dense layers, or with the common activations) that the model's set fits in, else the kernel
    of every cell; the batch and run kernels are always the latter."""
    from streamgru import Model
    from streamgru.packing import pack

    gru, lstm, dense = _zeros_layers()
    G, L, GEN, D, DA = (K.CELL_GRU_STD32, K.CELL_LSTM_STD32, K.CELL_GENERAL, K.CELL_DENSE,
                        K.CELL_DENSE_ALL)
    ALL = K.CELLS_ALL
    cases = [  # layers, dtype, cells_of, the one-event kernel's set
        ([gru(3, 4)], "float32", G, G),
        ([gru(3, 4)], "float64", GEN, ALL),
        ([gru(3, 4), dense(4, 2, "softmax")], "float32", G | D, G | D),
        ([gru(3, 4), dense(4, 2, "identity"), dense(2, 2, "elu")], "float32", G | D | DA, ALL),
        ([gru(3, 4, lbr=0)], "float32", GEN, ALL),
        ([gru(3, 4, f="hard_sigmoid")], "float32", GEN, ALL),
        ([gru(3, 4, clip=2.0)], "float32", GEN, ALL),
        ([lstm(3, 4)], "float32", L, L),
        ([lstm(3, 4, peepholes=True)], "float32", GEN, ALL),
        ([lstm(3, 4, proj_size=2, proj=np.zeros((2, 4)))], "float32", L, L),
        ([lstm(3, 4), dense(4, 2, "sigmoid")], "float32", L | D, L | D),
        ([lstm(3, 4, h="relu")], "float32", GEN, ALL),
        ([dense(3, 3, "relu"), lstm(3, 4), gru(4, 4)], "float32", D | L | G, ALL),
    ]
    for layers, dtype, cells, one_event in cases:
        p = pack(Model(layers), np.dtype(dtype))
        assert K.cells_of(p.table, p.fp, dtype) == cells, (layers, dtype)
        assert p.kernels is K.kernels_for(cells)  # made once per set and process
        assert p.kernels.cells == one_event, (layers, dtype)
        assert (p.kernels.step_one is K.step_one) == (one_event == ALL)
        assert p.kernels.step_serial is K.step_serial and p.kernels.run_sequence is K.run_sequence
    for bad in (0, K.CELLS_ALL + 1, "1"):
        with pytest.raises(ValueError, match="cells: expected a cell set"):
            K.kernels_for(bad)


def test_the_one_event_dense_activations_are_float32_only():
    """kernels._act_common (the Dense activations of the standard float32 cell sets' one-event
    kernels) holds the float32 loops alone: on float32 it gives the float32 tanh and softmax,
    a float64 array raises rather than taking the float32 approximation silently."""
    from numba import njit

    @njit(cache=False)
    def act(out, kind):  # _act_common is called only from compiled code
        K._act_common(out, 0, 0, out.shape[1], kind, 0.0, 0.0, 0.0, out.itemsize == 4)

    v = np.linspace(-4, 4, 9)
    out = v[None].astype(np.float32)
    act(out, K.ACT_TANH)
    np.testing.assert_allclose(out[0], np.tanh(v), atol=5e-7, rtol=0)
    out = v[None].astype(np.float32)
    act(out, K.ACT_SOFTMAX)
    np.testing.assert_allclose(out[0], np.exp(v) / np.exp(v).sum(), atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="without this layer's cell or activation"):
        act(v[None].copy(), K.ACT_TANH)


@pytest.mark.skipif(__import__("os").environ.get("NUMBA_DISABLE_JIT") == "1",
                    reason="about compiled kernels: as Python every kernel holds every cell")
def test_a_kernel_refuses_a_layer_outside_its_cell_set():
    """A kernel variant meets a layer whose cell it was not built with only if handed another
    model's table: it raises instead of skipping the cell (a silent wrong state)."""
    from streamgru import Model
    from streamgru.packing import pack

    gru, lstm, dense = _zeros_layers()
    p = pack(Model([lstm(3, 4), dense(4, 2, "softmax")]), np.dtype(np.float32))
    assert p.kernels.cells == K.CELL_LSTM_STD32 | K.CELL_DENSE
    other = K.kernels_for(K.CELL_GRU_STD32 | K.CELL_DENSE)  # the GRU model's set of the suite
    state = np.zeros((1, 8), np.float32)
    with pytest.raises(RuntimeError, match="without this layer's cell"):
        other.step_one(p.params, p.table, p.fp, state, 0, np.zeros((1, 3), np.float32),
                       np.zeros((1, 2), np.float32), np.zeros((2, p.scratch_width), np.float32),
                       True, 0)
