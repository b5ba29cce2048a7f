"""Helpers shared by the test files (tests/ is on sys.path, see conftest.py): ``import helpers``.

Only what several files need lives here; each helper is obviously correct on its own, and the
references they compute come from the float64 oracle, never from the engine.
"""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import oracle
import pytest

from streamgru import Layer, LSTMLayer

#: The engine against the float64 oracle, per step: float32 and float64 engines.
TOL = {"float32": 1e-5, "float64": 1e-9}


class OracleStreams:
    """Per-key float64 oracle states, fed row by row in call order (a repeated key in one call is
    stepped once per occurrence, as the engine does).

    Examples
    --------
    >>> ref = OracleStreams(model)               # doctest: +SKIP
    >>> y_ref = ref.step(["a", "b", "a"], x)     # doctest: +SKIP
    """

    def __init__(self, model, states=None):
        self.model = model
        self.states = {} if states is None else states  # key -> (state_size,) float64

    def state(self, key):
        """The key's current oracle state (zeros for a key never stepped)."""
        return self.states.get(key, np.zeros(self.model.state_size))

    def step(self, keys, x):
        """Advance each listed key by its row of ``x``; returns the outputs (n, output_size)."""
        ys = []
        for k, row in zip(keys, np.asarray(x)):
            y, s2 = oracle.step(self.model, self.state(k)[None, :],
                                np.asarray(row, np.float64)[None, :])
            self.states[k] = s2[0]
            ys.append(y[0])
        return np.array(ys).reshape(len(ys), self.model.output_size)


def oracle_streams(model, x, s0):
    """B streams stepped together by the float64 oracle: ``x`` (B, T, input_size), ``s0``
    (B, state_size) their start states -> outputs (B, T, output_size). A ``run`` of
    :func:`assert_matches_reference`."""
    s = np.asarray(s0, np.float64)
    ys = []
    for t in range(x.shape[1]):
        y, s = oracle.step(model, s, x[:, t])
        ys.append(y)
    return np.stack(ys, axis=1)


def engine_streams(dtype):
    """A ``run`` like :func:`oracle_streams` by an ``Engine(model, dtype=dtype)``: one stream
    per row of ``x``, opened from its row of ``s0`` and stepped with the others in one call."""
    def run(model, x, s0):
        from streamgru import Engine

        engine = Engine(model, dtype=dtype)
        keys = [f"s{b}" for b in range(x.shape[0])]
        for key, s in zip(keys, s0):
            engine.open(key, state=s)
        return np.stack([np.asarray(engine.step(keys, x[:, t])) for t in range(x.shape[1])],
                        axis=1)
    return run


def assert_matches_reference(model, ref, run=oracle_streams, atol=1e-5):
    """``run(model, x, s0)`` (:func:`oracle_streams`, :func:`engine_streams`) against a
    framework's own outputs stored in ``ref`` (a fixture ``.npz``: ``x``; ``y`` from zero states;
    ``h0`` start states in streamgru's layout and ``y_h0`` from them), every step.

    The frameworks ran in float32, so every ``run`` is held to a float32 tolerance.
    """
    x = ref["x"]
    zeros = np.zeros((x.shape[0], model.state_size))
    for start, s0, want in (("zero", zeros, ref["y"]), ("h0", ref["h0"], ref["y_h0"])):
        np.testing.assert_allclose(run(model, x, s0), want, rtol=0, atol=atol,
                                   err_msg=f"from the {start} state")


#: The ``run`` parameters of a test of converted LSTM models against a framework's outputs: the
#: oracle, and the engine in both dtypes, skipped until the engine runs LSTM layers
#: (``LSTMLayer.runnable``; docs/lstm.md).
LSTM_RUNS = [pytest.param(oracle_streams, id="oracle")] + [
    pytest.param(engine_streams(dtype), id=f"engine-{dtype}",
                 marks=pytest.mark.skipif(not LSTMLayer.runnable,
                                          reason="the engine has no LSTM kernel cell yet "
                                                 "(docs/lstm.md)"))
    for dtype in ("float32", "float64")]


def snapshot(engine):
    """Every open stream's state, by key: to check that a refused call changed nothing."""
    return {k: engine.state(k) for k in engine.keys()}


def assert_unchanged(engine, snap):
    """The engine holds exactly the streams of ``snap`` (a :func:`snapshot`), bit for bit."""
    assert len(engine) == len(engine.keys()) == len(snap)
    assert sorted(engine.keys(), key=repr) == sorted(snap, key=repr)
    for k, s in snap.items():
        np.testing.assert_array_equal(engine.state(k), s)


def torch_to_canonical(a):
    """PyTorch's gate blocks (r, z, n) -> the canonical (z, r, n) along axis 0, written here
    independently of the converters so that tests of the converters' swap are not circular."""
    r, z, n = np.split(np.asarray(a), 3, axis=0)
    return np.concatenate([z, r, n], axis=0)


def _activation_triple(spec):
    """``"tanh"`` or ``("leakyrelu", 0.2)`` -> ``("leakyrelu", 0.2, 0.0)``: what ``oracle.act``
    takes. Parameters not given are 0.0; a test that uses a parameterised activation passes its
    parameters explicitly."""
    name, *params = (spec,) if isinstance(spec, str) else spec
    if len(params) > 2:
        raise ValueError(f"activation: expected (name[, alpha[, beta]]), got {spec!r}")
    params = [float(p) for p in params] + [0.0] * (2 - len(params))
    return (name.lower(), params[0], params[1])


@dataclass(frozen=True)
class LSTMSpec:
    """An LSTM layer in the canonical layout of streamgru.layers.lstm, for the float64 oracle
    (``oracle.lstm_cell``) without streamgru's own validation: the oracle's checks against
    torch and onnxruntime hold independently of :class:`streamgru.LSTMLayer`, which
    :meth:`layer` builds from the same tensors.

    Attributes
    ----------
    W : (4*H, I), R : (4*H, H_out), Wb, Rb : (4*H,)
        Gate blocks in the order i, o, f, c; H_out is ``proj_size`` with a projection, else H.
    P : (3*H,) or None
        Peepholes i, o, f.
    proj : (proj_size, H) or None
        PyTorch's ``weight_hr``.
    input_forget : int
        1 couples the gates: f = 1 - i.
    clip : float or None
    f, g, h : activation name or (name, alpha, beta)
        Gate, cell-candidate and cell-output activations.
    """

    W: np.ndarray
    R: np.ndarray
    Wb: np.ndarray
    Rb: np.ndarray
    P: np.ndarray | None = None
    proj: np.ndarray | None = None
    input_forget: int = 0
    clip: float | None = None
    f: str | tuple = "sigmoid"
    g: str | tuple = "tanh"
    h: str | tuple = "tanh"
    kind: ClassVar[str] = "lstm"

    def __post_init__(self):
        for name in ("f", "g", "h"):
            object.__setattr__(self, name, _activation_triple(getattr(self, name)))
        H, P = self.hidden_size, self.output_size
        shapes = {"W": (4 * H, self.input_size), "R": (4 * H, P), "Wb": (4 * H,), "Rb": (4 * H,),
                  "P": (3 * H,), "proj": (P, H)}
        for name, shape in shapes.items():
            value = getattr(self, name)
            if value is not None and np.shape(value) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {np.shape(value)}")

    @property
    def input_size(self):
        return self.W.shape[1]

    @property
    def hidden_size(self):
        return self.W.shape[0] // 4

    @property
    def proj_size(self):
        """0 without a projection, as in PyTorch."""
        return 0 if self.proj is None else self.proj.shape[0]

    @property
    def output_size(self):
        """The width of h: ``proj_size`` with a projection, else ``hidden_size``."""
        return self.proj_size or self.hidden_size

    @property
    def state_size(self):
        """h then c: ``output_size + hidden_size`` values per stream."""
        return self.output_size + self.hidden_size

    @classmethod
    def random(cls, input_size, hidden_size, seed, *, proj_size=0, peepholes=False, scale=0.5,
               **kwargs):
        """Seeded float64 weights of a bounded recurrence (scaled by 1/sqrt(fan-in)); ``kwargs``
        set the other attributes (``clip``, ``input_forget``, ``f``, ``g``, ``h``)."""
        rng = np.random.default_rng(seed)
        I, H = input_size, hidden_size
        P = proj_size or H
        return cls(
            W=rng.normal(scale=scale / np.sqrt(I), size=(4 * H, I)),
            R=rng.normal(scale=scale / np.sqrt(P), size=(4 * H, P)),
            Wb=rng.normal(scale=0.3, size=4 * H),
            Rb=rng.normal(scale=0.3, size=4 * H),
            P=rng.normal(scale=0.5, size=3 * H) if peepholes else None,
            proj=rng.normal(scale=1.0 / np.sqrt(H), size=(P, H)) if proj_size else None,
            **kwargs,
        )

    def layer(self, dtype=np.float64):
        """The same layer as a :class:`streamgru.LSTMLayer` with tensors in ``dtype``."""
        cast = {n: None if getattr(self, n) is None else np.asarray(getattr(self, n), dtype)
                for n in ("W", "R", "Wb", "Rb", "P", "proj")}
        return LSTMLayer(self.input_size, self.hidden_size, **cast, proj_size=self.proj_size,
                         f=self.f, g=self.g, h=self.h, clip=self.clip,
                         input_forget=self.input_forget)


class Accumulator(Layer, register=False):
    """A layer kind known only to the protocol, for tests of code that must not branch on kinds:
    never registered, nothing can run it; recurrent, with a state (2n) wider than its output
    (n), as an LSTM's is."""

    kind = "accumulator"
    recurrent = True

    def __init__(self, n, scale):
        self.input_size = self.output_size = n
        self.state_size = 2 * n
        self.scale = np.array(scale, np.float32)
        self.scale.setflags(write=False)

    def tensors(self):
        return {"scale": self.scale}

    def config(self):
        return {"kind": self.kind, "n": self.input_size}

    @classmethod
    def from_config(cls, cfg, tensors):
        return cls(cfg["n"], tensors["scale"])

    @property
    def macs(self):
        return self.input_size

    def describe(self):
        return "accumulator"


def mixed_lstm_model(dtype=np.float64, seed=0):
    """A small Dense -> LSTM (projection, peepholes, clip) -> GRU -> Dense model, for the tests of
    what takes an LSTM layer through the protocol (native file, info, the engine's refusal)."""
    from streamgru import DenseLayer, GRULayer, Model

    rng = np.random.default_rng(seed)
    lstm = LSTMSpec.random(3, 4, seed, proj_size=2, peepholes=True, clip=2.5,
                           h=("scaledtanh", 1.5, 0.5)).layer(dtype)
    gru = GRULayer(2, 3, rng.normal(size=(9, 2)), rng.normal(size=(9, 3)), linear_before_reset=1)
    return Model([DenseLayer(2, 3, rng.normal(size=(3, 2)), activation="relu"), lstm, gru,
                  DenseLayer(3, 2, rng.normal(size=(2, 3)))], source="test").astype(dtype)


def check_against_oracle(model, dtype, steps=200, n=3, seed=0, regime="serial", monkeypatch=None,
                         rtol=0.0, weights=None):
    """Step ``n`` streams of ``model`` from a random nonzero state ``steps`` times through the
    engine's ``regime`` ("serial", "parallel", "wide" or "one": one event per call) and compare
    every output and the final states with the float64 oracle at :data:`TOL` (plus ``rtol``,
    for states that grow large). With compact ``weights`` the engine stores them so and the
    oracle steps :func:`dequantized` ``model``. Returns the largest absolute error seen."""
    from streamgru import Engine
    from streamgru import engine as engine_mod

    if regime == "parallel":
        monkeypatch.setattr(engine_mod, "PARALLEL_MIN_ROWS", 1)
    elif regime == "wide":  # few rows, products spread over threads by weight panels
        monkeypatch.setattr(engine_mod, "WIDE_MIN_MACS", 0)
    rng = np.random.default_rng(seed)
    eng = Engine(model, dtype=dtype, weights=weights)
    if weights is not None:
        model = dequantized(model, weights)
    s0 = rng.normal(size=(n, model.state_size)) * 0.5
    for i in range(n):
        eng.set_state(i, s0[i])
    ref = s0.astype(dtype).astype(np.float64)
    worst = 0.0
    for _ in range(steps):
        x = rng.normal(size=(n, model.input_size)).astype(dtype)
        if regime == "one":  # one event per call: the one-event kernel
            y = np.concatenate([eng.step([i], x[i:i + 1]) for i in range(n)])
        else:
            y = eng.step(list(range(n)), x)
        y_ref, ref = oracle.step(model, ref, x)
        worst = max(worst, np.abs(y - y_ref).max())
        np.testing.assert_allclose(y, y_ref, atol=TOL[dtype], rtol=rtol)
    for i in range(n):
        np.testing.assert_allclose(eng.state(i), ref[i], atol=TOL[dtype], rtol=rtol)
    return worst


def dequantized(model, weights):
    """``model`` with every weight matrix (2-D tensor) replaced by what an engine with compact
    ``weights`` ("float16", "int8") computes with, its dequantization by
    :mod:`streamgru.compact` (whose definitions tests/test_compact.py checks): the reference
    model for the oracle. Vectors (biases, peepholes) are kept; float64 tensors."""
    from streamgru import Model, compact

    layers = []
    for layer in model.layers:
        t = {name: (compact.dequantize(*compact.quantize(v, weights)) if v.ndim == 2 else v)
             for name, v in layer.tensors().items()}
        layers.append(type(layer).from_config(layer.config(),
                                              {k: np.asarray(v, np.float64) for k, v in t.items()}))
    return Model(layers)
