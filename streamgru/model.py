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

A layer's **weight matrices** are its 2-D tensors (GRU W, R; LSTM W, R, proj; Dense W; rows are
outputs); its 1-D tensors (biases, peepholes) are vectors. A model whose every weight matrix is
exactly the dequantization of a compact form (:mod:`streamgru.compact`: ``"float16"`` or
``"int8"``) says so in :attr:`Model.stored_as`; :meth:`Model.compacted` makes one, and a compact
native file (``model.save(path, weights="int8")``) loads as one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from . import compact
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
    stored_as : None, "float16" or "int8"
        The compact form whose dequantization every weight matrix is (see the parameter).

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

    def __init__(self, layers: Sequence, *, source: str | None = None, notes: Sequence = (),
                 stored_as: str | None = None):
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
        self._stored_as = _check_stored_as(layers, stored_as)
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
    def stored_as(self):
        """None for full-precision weights; ``"float16"`` or ``"int8"`` when every weight matrix
        is exactly the dequantization of that compact form (checked when the model was built).

        Kept by what keeps the matrices' values: :meth:`astype` (float32 values are exact in
        float64, and cast back unchanged), the native file (``save`` writes this form by
        default, ``load`` sets it again) and pickling. Anything that builds a new model from
        layers (``Model(model.layers)``, a converter) starts from None unless it passes
        ``stored_as=``, which is checked again.

        Examples
        --------
        >>> m = Model.random(3, 4)
        >>> m.stored_as, m.compacted("int8").stored_as, m.compacted("int8").astype("float64").stored_as
        (None, 'int8', 'int8')
        """
        return self._stored_as

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
        return type(self)(layers, source=self.source, notes=self.notes, stored_as=self._stored_as)

    def compacted(self, weights):
        """The model whose weight matrices are their compact form ``weights``, dequantized.

        Every weight matrix ``W`` (a layer's 2-D tensor) becomes
        ``compact.dequantize(*compact.quantize(W, weights))`` (float32 values; in a float64 model
        held as float64, exactly), every vector (bias, peephole) is unchanged. The result has
        ``stored_as == weights``, the same source, and the notes plus one saying so. It is what
        ``model.save(path, weights=weights)`` writes and ``load`` gives back, bit for bit; its
        matrices quantize back to exactly the compact form that ``Engine(model,
        weights=weights)`` stores for this model. Its weights approximate this model's (int8:
        each within half a step, ``max|W[row]| / 254``; float16: to 11 significant bits, for
        values in float16's normal range).

        Parameters
        ----------
        weights : {"float16", "int8"}
            The compact form (:mod:`streamgru.compact`). Compacting a model already stored as
            ``weights`` returns it unchanged; one stored in the other form is quantized again
            from its current values.

        Raises
        ------
        ValueError
            ``weights`` is not a compact form, or (float16) a weight is beyond float16's range
            (the message names the layer and tensor).

        Examples
        --------
        >>> m = Model.random(3, 4)
        >>> m8 = m.compacted("int8")
        >>> m8.stored_as, m8.config() == m.config(), m8.fingerprint == m.fingerprint
        ('int8', True, False)
        >>> bool(abs(m8.layers[0].W - m.layers[0].W).max() <= abs(m.layers[0].W).max() / 254)
        True
        """
        weights = _compact_form(weights, "weights")
        if weights == self._stored_as:
            return self
        layers = []
        for i, layer in enumerate(self._layers):
            tensors = {}
            for name, t in layer.tensors().items():
                if t.ndim == 2:
                    try:
                        stored, scales = compact.quantize(t, weights, name)
                    except ValueError as exc:
                        raise ValueError(f"layers[{i}].{exc}") from None
                    t = compact.dequantize(stored, scales).astype(t.dtype)
                tensors[name] = t
            layers.append(type(layer).from_config(layer.config(), tensors))
        how = ("int8, symmetric, one float32 scale per output row" if weights == "int8"
               else "float16, rounded to nearest")
        note = (f"weights stored as {weights}: every weight matrix was quantized ({how}), so "
                f"the weights approximate the original model's")
        return type(self)(layers, source=self.source, notes=(*self.notes, note),
                          stored_as=weights)

    def weight_bytes(self, weights="float32"):
        """Bytes of each layer's weights with the matrices stored as ``weights`` (int8: with
        their float32 row scales) and the vectors as float32, as the Engine and a compact
        native file keep them.

        Examples
        --------
        >>> m = Model.random(3, 4)  # one GRU layer: W (12, 3), R (12, 4), Wb, Rb (12,)
        >>> m.weight_bytes("float32"), m.weight_bytes("float16"), m.weight_bytes("int8")
        ((432,), (264,), (276,))
        """
        weights = compact.weights_format(weights)
        return tuple(sum(compact.stored_bytes(t.shape, weights) if t.ndim == 2 else 4 * t.size
                         for t in layer.tensors().values()) for layer in self._layers)

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

    def save(self, path, weights=None):
        """Write the versioned native file (``.sgru``: safetensors + JSON metadata).

        Parameters
        ----------
        path : str or os.PathLike
        weights : {None, "float32", "float16", "int8"}
            How the weight matrices are stored. None (default): as :attr:`stored_as` says, full
            precision for a model that has none. ``"float32"``: full precision (the model's
            float32 or float64 tensors, the file format of every streamgru release).
            ``"float16"``/``"int8"``: compactly (:mod:`streamgru.formats` gives the layout); the
            model must be float32.

        ``streamgru.load(path)`` reads it back bit-exact: with full precision this model, with
        a compact form ``self.compacted(weights)`` (``stored_as`` set).
        """
        from .formats import save_model

        save_model(self, path, weights=weights)

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
        stored = f", stored_as={self._stored_as!r}" if self._stored_as else ""
        return (
            f"Model(layers={len(self._layers)}, input_size={self.input_size}, "
            f"output_size={self.output_size}, state_size={self.state_size}{stored})"
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


def _compact_form(weights, name):
    """A compact form's name, ``"float16"`` or ``"int8"`` (``"float32"`` is full precision)."""
    weights = compact.weights_format(weights, name)
    if weights == "float32":
        raise ValueError(f"{name}: expected 'float16' or 'int8' (a compact form), got "
                         f"'float32'; full precision is the model itself")
    return weights


def _check_stored_as(layers, stored_as):
    """``stored_as`` once every weight matrix of ``layers`` is checked to be exactly its
    dequantization in that form: the Engine stores a model's weights in this form by default,
    so a wrong claim would change what it computes."""
    if stored_as is None:
        return None
    stored_as = _compact_form(stored_as, "stored_as")
    for i, layer in enumerate(layers):
        for name, t in layer.tensors().items():
            if t.ndim != 2:
                continue
            try:
                again = compact.dequantize(*compact.quantize(t, stored_as, name))
            except ValueError as exc:
                raise ValueError(f"stored_as: expected every weight matrix exactly in "
                                 f"{stored_as} form, got layers[{i}].{exc}") from None
            if not np.array_equal(again, t):
                diff = float(np.abs(again.astype(np.float64) - t).max())
                raise ValueError(f"stored_as: expected every weight matrix exactly in "
                                 f"{stored_as} form, got layers[{i}].{name} that is not (max "
                                 f"|W - dequantize(quantize(W))| = {diff:.3g}); build the model "
                                 f"with model.compacted({stored_as!r})")
    return stored_as
