"""Helpers shared by the test files (tests/ is on sys.path, see conftest.py): ``import helpers``.

Only what several files need lives here; each helper is obviously correct on its own, and the
references they compute come from the float64 oracle, never from the engine.
"""

import numpy as np
import oracle

from streamgru import Layer


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
