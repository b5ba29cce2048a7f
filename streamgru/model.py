"""The model: a frozen sequential stack of layers, in streamgru's canonical layouts.

Each layer kind is one class of :mod:`streamgru.layers` (:class:`GRULayer`, :class:`LSTMLayer`,
:class:`DenseLayer`), with its canonical weight layout and equations written once, at the top of
its module (:mod:`streamgru.layers.gru`, :mod:`streamgru.layers.lstm`,
:mod:`streamgru.layers.dense`); the protocol every kind follows is
in :mod:`streamgru.layers.base`. :class:`Model` (``GRUModel`` is the same class, its name before
the layer protocol) validates and chains the layers and reads them only through that protocol.

A stream's state is one flat vector of ``state_size`` values: the states of the recurrent layers
(a GRU layer's h; an LSTM layer's h then C) concatenated in layer order (``model.state_slices``
gives each one's slice).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from .layers import LAYER_KINDS, DenseLayer, GRULayer, Layer, LSTMLayer

__all__ = ["Model", "GRUModel", "Layer", "GRULayer", "LSTMLayer", "DenseLayer"]


def _kind_names(recurrent=None):
    """The registered classes' names, recurrent kinds first: "GRULayer or DenseLayer"."""
    names = [c.__name__ for c in sorted(LAYER_KINDS.values(), key=lambda c: not c.recurrent)
             if recurrent is None or c.recurrent == recurrent]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


class Model:
    """A frozen sequential stack of layers (:class:`GRULayer`, :class:`DenseLayer`, any
    registered :class:`Layer` kind), at least one of them recurrent.

    ``streamgru.GRUModel`` is this class under its earlier name.

    Parameters
    ----------
    layers : sequence of Layer
        In order from input to output; each layer's input size must equal the previous layer's
        output size.
    source : str, optional
        Where the model came from (e.g. ``"pytorch"``), kept as metadata only.
    notes : sequence of str, optional
        What the converter decided about the source that a user should know, e.g. which graph
        input it took as the per-stream state and which outputs it left to the engine. Metadata
        of this conversion only: not saved in the native file, not part of the fingerprint.

    Attributes
    ----------
    input_size, output_size : int
        Width of one step's input and output.
    state_size : int
        Sum of the layers' ``state_size`` (a GRU layer's hidden size, an LSTM layer's
        ``output_size + hidden_size``; 0 for Dense): the length
        of one stream's flat state vector.
    state_slices : tuple of slice
        The slice of the state vector held by each recurrent layer, in order.
    fingerprint : str
        SHA-256 over the layer configuration and the exact bytes of every tensor.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> gru = GRULayer(3, 8, rng.normal(size=(24, 3)), rng.normal(size=(24, 8)), linear_before_reset=1)
    >>> head = DenseLayer(8, 2, rng.normal(size=(2, 8)))
    >>> model = Model([gru, head])
    >>> model.input_size, model.output_size, model.state_size
    (3, 2, 8)
    >>> GRUModel is Model
    True
    """

    def __init__(self, layers: Sequence, *, source: str | None = None, notes: Sequence = ()):
        if isinstance(layers, Layer) or not isinstance(layers, Sequence):
            raise TypeError(
                f"layers: expected a list of layers ({_kind_names()}), got {type(layers).__name__}"
            )
        layers = tuple(layers)
        if not layers:
            raise ValueError(f"layers: expected at least one {_kind_names(True)}, got an empty "
                             f"list")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"layers[{i}]: expected a {_kind_names()}, got {type(layer).__name__}"
                )
        if not any(layer.state_size > 0 for layer in layers):
            kinds = sorted({type(layer).__name__.removesuffix("Layer") for layer in layers})
            raise ValueError(f"layers: expected at least one {_kind_names(True)}, got only "
                             f"{' and '.join(kinds)} layers")
        for i in range(1, len(layers)):
            if layers[i].input_size != layers[i - 1].output_size:
                raise ValueError(
                    f"layers[{i}]: expected input size {layers[i - 1].output_size} (the output of "
                    f"layers[{i - 1}]), got {layers[i].input_size}"
                )
        self._layers = layers
        self.source = source
        self.notes = tuple(str(n) for n in notes)
        slices, off = [], 0
        for layer in layers:
            if layer.state_size > 0:
                slices.append(slice(off, off + layer.state_size))
                off += layer.state_size
        self._state_slices = tuple(slices)
        self._state_size = off
        self._fingerprint = None

    @property
    def layers(self):
        return self._layers

    @property
    def input_size(self):
        return self._layers[0].input_size

    @property
    def output_size(self):
        return self._layers[-1].output_size

    @property
    def state_size(self):
        return self._state_size

    @property
    def state_slices(self):
        return self._state_slices

    @property
    def recurrent_layers(self):
        """The layers that hold per-stream state, in order (one per ``state_slices`` entry)."""
        return tuple(layer for layer in self._layers if layer.state_size > 0)

    @property
    def held_output_slice(self):
        """The columns of a stream's state holding the last recurrent layer's latest output
        (its h: every recurrent kind keeps its output as the first ``output_size`` values of
        its state); the layers after it map that to the model's output for a held state
        (``Engine(missing="skip")``).

        Examples
        --------
        >>> Model.random(3, [4, 5], cell=["gru", "lstm"]).held_output_slice
        slice(4, 9, None)
        """
        start = self._state_slices[-1].start
        return slice(start, start + self.recurrent_layers[-1].output_size)

    @property
    def gru_layers(self):
        """The GRU layers, in order."""
        return tuple(layer for layer in self._layers if isinstance(layer, GRULayer))

    @property
    def num_parameters(self):
        return sum(layer.num_parameters for layer in self._layers)

    @property
    def dtype(self):
        """The widest dtype among the stored tensors (float32 or float64)."""
        return np.result_type(*[t for layer in self._layers for t in layer.tensors().values()])

    def astype(self, dtype):
        """A copy of the model with every tensor in ``dtype`` (float32 or float64).

        Same layers, source and notes; a new fingerprint (the tensors' bytes differ). A weight
        beyond float32's range is refused (ValueError naming the tensor), never made inf.

        Examples
        --------
        >>> m = Model.random(3, 4, dtype="float64")
        >>> m.astype("float32").dtype, m.astype("float32").config() == m.config()
        (dtype('float32'), True)
        """
        layers = []
        for i, layer in enumerate(self._layers):
            try:
                layers.append(layer.astype(dtype))
            except ValueError as exc:
                if str(exc).startswith("dtype:"):
                    raise
                raise ValueError(f"layers[{i}].{exc}") from None
        return type(self)(layers, source=self.source, notes=self.notes)

    def config(self):
        """JSON-ready description of the layers (no tensors)."""
        return {"layers": [layer.config() for layer in self._layers]}

    def named_tensors(self):
        """``{"layers.{i}.{name}": array}`` for every tensor, in a stable order."""
        out = {}
        for i, layer in enumerate(self._layers):
            for name, t in layer.tensors().items():
                out[f"layers.{i}.{name}"] = t
        return out

    @property
    def fingerprint(self):
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps(self.config(), sort_keys=True).encode())
            for name, t in self.named_tensors().items():
                h.update(name.encode())
                h.update(str(t.dtype).encode())
                h.update(repr(t.shape).encode())
                h.update(t.tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def save(self, path):
        """Write the versioned native file (``.sgru``: safetensors + JSON metadata).

        ``streamgru.load(path)`` reads it back bit-exact.
        """
        from .formats import save_model

        save_model(self, path)

    def summary(self):
        """A short human-readable description, one line per layer."""
        lines = [f"Model: input_size={self.input_size}, output_size={self.output_size}, "
                 f"state_size={self.state_size}, parameters={self.num_parameters}, "
                 f"dtype={self.dtype}" + (f", source={self.source}" if self.source else "")]
        lines += [f"  [{i}] {layer!r}" for i, layer in enumerate(self._layers)]
        return "\n".join(lines + [self.state_layout()])

    def state_layout(self):
        """One line: which columns of a stream's state (``engine.state(key)``) belong to which
        layer and part.

        Examples
        --------
        >>> Model.random(3, [4, 5], cell=["gru", "lstm"]).state_layout()
        'state per stream (14 values): [0] gru h 0:4; [1] lstm h 4:9, C 9:14'
        """
        parts, off = [], 0
        for i, layer in enumerate(self._layers):
            if not layer.state_size:
                continue
            spans = []
            for name, width in layer.state_parts:
                spans.append(f"{name} {off}:{off + width}")
                off += width
            parts.append(f"[{i}] {layer.kind} " + ", ".join(spans))
        return f"state per stream ({self.state_size} values): " + "; ".join(parts)

    def __repr__(self):
        return (
            f"Model(layers={len(self._layers)}, input_size={self.input_size}, "
            f"output_size={self.output_size}, state_size={self.state_size})"
        )

    @classmethod
    def random(cls, input_size, hidden_sizes, *, dense_before=(), dense_after=(),
               linear_before_reset=1, cell="gru", seed=0, scale=None, dtype=np.float32):
        """A seeded random model, for tests, benchmarks and demos.

        Parameters
        ----------
        input_size : int
        hidden_sizes : int or sequence of int
            One recurrent layer per entry.
        dense_before, dense_after : sequence of (width, activation)
            Dense layers before the first and after the last recurrent layer.
        linear_before_reset : {0, 1}
            Of the GRU layers.
        cell : {"gru", "lstm"} or sequence of them
            The kind of every recurrent layer, or of each (one entry per hidden size); LSTM
            layers are PyTorch's (sigmoid, tanh, tanh; no peepholes, no projection).
        seed : int
        scale : float, optional
            Weight scale; defaults to PyTorch's ``1/sqrt(fan)`` initialisation.
        dtype : numpy dtype

        Examples
        --------
        >>> m = Model.random(4, [16, 16], dense_after=[(3, "softmax")])
        >>> m.state_size, m.output_size
        (32, 3)
        """
        rng = np.random.default_rng(seed)
        if isinstance(hidden_sizes, (int, np.integer)):
            hidden_sizes = [int(hidden_sizes)]

        def u(shape, fan):
            s = scale if scale is not None else 1.0 / np.sqrt(fan)
            return rng.uniform(-s, s, size=shape).astype(dtype)

        layers, width = [], input_size
        for out, act in dense_before:
            layers.append(DenseLayer(width, out, u((out, width), width), u(out, width), act))
            width = out
        cells = [cell] * len(hidden_sizes) if isinstance(cell, str) else list(cell)
        if len(cells) != len(hidden_sizes) or not set(cells) <= {"gru", "lstm"}:
            raise ValueError(f"cell: expected 'gru', 'lstm' or one of them per hidden size "
                             f"({len(hidden_sizes)}), got {cell!r}")
        for H, kind in zip(hidden_sizes, cells):
            if kind == "gru":
                layers.append(GRULayer(width, H, u((3 * H, width), H), u((3 * H, H), H),
                                       u(3 * H, H), u(3 * H, H),
                                       linear_before_reset=linear_before_reset))
            else:
                layers.append(LSTMLayer(width, H, u((4 * H, width), H), u((4 * H, H), H),
                                        u(4 * H, H), u(4 * H, H)))
            width = H
        for out, act in dense_after:
            layers.append(DenseLayer(width, out, u((out, width), width), u(out, width), act))
            width = out
        return cls(layers, source="random")


#: The model class's name before the layer protocol; public API, kept as the same class.
GRUModel = Model
