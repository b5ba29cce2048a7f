"""The model: a frozen sequential stack of GRU and Dense layers, in streamgru's one canonical layout.

Canonical GRU layout (what every converter must produce)
--------------------------------------------------------
Gate order is ONNX's: **z (update), r (reset), n (candidate)**, stacked along the first axis.

======  =====================  ===========================================================
name    shape                  meaning
======  =====================  ===========================================================
W       (3*H, I)               input weights, rows [W_z; W_r; W_n]    (ONNX ``W[0]``)
R       (3*H, H)               recurrent weights, rows [R_z; R_r; R_n] (ONNX ``R[0]``)
Wb      (3*H,)                 input bias [Wb_z; Wb_r; Wb_n]           (ONNX ``B[0][:3H]``)
Rb      (3*H,)                 recurrent bias [Rb_z; Rb_r; Rb_n]       (ONNX ``B[0][3H:]``)
======  =====================  ===========================================================

With ``f`` the gate activation (default sigmoid), ``g`` the candidate activation (default tanh),
``c(v) = clip(v, -clip, clip)`` when ``clip`` is set (identity otherwise), ``*`` elementwise::

    z  = f(c(W_z x + Wb_z + R_z h + Rb_z))
    r  = f(c(W_r x + Wb_r + R_r h + Rb_r))
    n  = g(c(W_n x + Wb_n + R_n (r * h) + Rb_n))      if linear_before_reset == 0
    n  = g(c(W_n x + Wb_n + r * (R_n h + Rb_n)))      if linear_before_reset == 1
    h' = (1 - z) * n + z * h

These are exactly the ONNX GRU equations. For converter authors:

* **PyTorch** ``nn.GRU``/``nn.GRUCell`` stores gates in the order (r, z, n); swap the first two
  blocks of ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``. PyTorch is
  ``linear_before_reset=1``; its ``b_hn`` is ``Rb_n``.
* **Keras** ``GRU`` stores ``kernel`` as (I, 3H) and ``recurrent_kernel`` as (H, 3H) in the order
  (z, r, h): transpose, no reordering. ``reset_after=True`` is ``linear_before_reset=1`` with
  bias shape (2, 3H) = [Wb; Rb]; ``reset_after=False`` is ``linear_before_reset=0`` with a single
  bias (3H,) = Wb and Rb = 0.

Dense layer: ``y = act(W x + b)`` with W ``(out_features, in_features)`` (PyTorch ``nn.Linear``
layout; Keras ``Dense.kernel`` must be transposed), applied to every step independently.

A stream's state is one flat vector of ``state_size`` values: the hidden vectors of the GRU layers
in layer order (``model.state_slices`` gives each layer's slice).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from .activations import DENSE_ACTIVATIONS, GRU_ACTIVATIONS, canonical_activation

__all__ = ["GRULayer", "DenseLayer", "GRUModel"]

_FLOAT_DTYPES = (np.float32, np.float64)


def _weight(value, name, shape):
    """Validate one weight tensor: a real float array of exactly ``shape``, all finite.

    Returns a frozen C-contiguous copy in float32 or float64 (float16 is widened to float32).
    """
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except Exception as exc:  # ragged nested lists and the like
            raise TypeError(f"{name}: expected a float array of shape {shape}, got {exc}") from None
        if arr.dtype.kind in "iu" and arr.size == 0:
            arr = arr.astype(np.float64)
        elif arr.dtype.kind in "iu":
            # A nested list of Python ints is a plain literal, not a typed array: read it as float64.
            arr = arr.astype(np.float64)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.dtype.type not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a float32 or float64 array, got dtype {arr.dtype}"
            f"; convert it with .astype(np.float32)"
        )
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name}: expected finite values, got {arr[tuple(bad)]} at index {tuple(int(i) for i in bad)}"
        )
    out = np.array(arr, dtype=arr.dtype, order="C", copy=True)
    out.setflags(write=False)
    return out


def _size(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


class GRULayer:
    """One GRU layer in the canonical layout (gate order z, r, n; see the module docstring).

    Parameters
    ----------
    input_size, hidden_size : int
        I and H.
    W : array_like, (3*hidden_size, input_size)
        Input weights, rows [W_z; W_r; W_n].
    R : array_like, (3*hidden_size, hidden_size)
        Recurrent weights, rows [R_z; R_r; R_n].
    Wb, Rb : array_like, (3*hidden_size,), optional
        Input and recurrent biases (zeros when omitted).
    linear_before_reset : bool or {0, 1}
        Required: 1 for PyTorch and Keras ``reset_after=True``, 0 for ONNX's default and Keras
        ``reset_after=False``. Never guessed.
    f, g : str or tuple, optional
        Gate and candidate activations (default ``"sigmoid"``, ``"tanh"``), as a name or
        ``(name, alpha, beta)`` with ONNX semantics.
    clip : float or None
        ONNX cell clip: activation inputs are clamped to ``[-clip, clip]``. None (default) is off.

    Examples
    --------
    >>> import numpy as np
    >>> H, I = 4, 3
    >>> layer = GRULayer(I, H, np.zeros((3 * H, I)), np.zeros((3 * H, H)), linear_before_reset=1)
    >>> layer.hidden_size, layer.f, layer.g
    (4, ('sigmoid', 0.0, 0.0), ('tanh', 0.0, 0.0))
    """

    kind = "gru"

    def __init__(self, input_size, hidden_size, W, R, Wb=None, Rb=None, *, linear_before_reset,
                 f="sigmoid", g="tanh", clip=None):
        I = _size(input_size, "input_size")
        H = _size(hidden_size, "hidden_size")
        self.input_size = I
        self.hidden_size = H
        self.W = _weight(W, "W", (3 * H, I))
        self.R = _weight(R, "R", (3 * H, H))
        dt = np.result_type(self.W, self.R)
        self.Wb = _weight(np.zeros(3 * H, dt) if Wb is None else Wb, "Wb", (3 * H,))
        self.Rb = _weight(np.zeros(3 * H, dt) if Rb is None else Rb, "Rb", (3 * H,))
        if isinstance(linear_before_reset, (bool, np.bool_)):
            lbr = int(linear_before_reset)
        elif isinstance(linear_before_reset, (int, np.integer)) and linear_before_reset in (0, 1):
            lbr = int(linear_before_reset)
        else:
            raise ValueError(
                f"linear_before_reset: expected 0 or 1 (or a bool), got {linear_before_reset!r}"
            )
        self.linear_before_reset = lbr
        self.f = canonical_activation(f, allowed=GRU_ACTIVATIONS, what="f")
        self.g = canonical_activation(g, allowed=GRU_ACTIVATIONS, what="g")
        if clip is not None:
            if isinstance(clip, bool):
                raise TypeError(f"clip: expected a positive float or None, got {clip!r}")
            try:
                clip = float(clip)
            except (TypeError, ValueError):
                raise TypeError(f"clip: expected a positive float or None, got {clip!r}") from None
            if not (clip > 0 and np.isfinite(clip)):
                raise ValueError(f"clip: expected a positive finite float or None, got {clip!r}")
        self.clip = clip

    @property
    def output_size(self):
        return self.hidden_size

    @property
    def state_size(self):
        return self.hidden_size

    def tensors(self):
        """The weight tensors by name, in the canonical layout."""
        return {"W": self.W, "R": self.R, "Wb": self.Wb, "Rb": self.Rb}

    def config(self):
        """JSON-ready description of everything but the tensors."""
        return {
            "kind": "gru",
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "linear_before_reset": self.linear_before_reset,
            "f": list(self.f),
            "g": list(self.g),
            "clip": self.clip,
        }

    @property
    def num_parameters(self):
        return sum(int(t.size) for t in self.tensors().values())

    def __repr__(self):
        extra = f", clip={self.clip}" if self.clip is not None else ""
        return (
            f"GRULayer(input_size={self.input_size}, hidden_size={self.hidden_size}, "
            f"linear_before_reset={self.linear_before_reset}, f={self.f[0]!r}, g={self.g[0]!r}{extra})"
        )


class DenseLayer:
    """A per-step affine layer with an activation: ``y = act(W x + b)``.

    Parameters
    ----------
    in_features, out_features : int
    W : array_like, (out_features, in_features)
        PyTorch ``nn.Linear`` layout.
    b : array_like, (out_features,), optional
        Zeros when omitted.
    activation : str or tuple
        Any name of :mod:`streamgru.activations` (``identity`` by default, ``softmax`` allowed).

    Examples
    --------
    >>> import numpy as np
    >>> DenseLayer(3, 2, np.ones((2, 3)), activation="relu")
    DenseLayer(in_features=3, out_features=2, activation='relu')
    """

    kind = "dense"

    def __init__(self, in_features, out_features, W, b=None, activation="identity"):
        self.in_features = _size(in_features, "in_features")
        self.out_features = _size(out_features, "out_features")
        self.W = _weight(W, "W", (self.out_features, self.in_features))
        self.b = _weight(np.zeros(self.out_features, self.W.dtype) if b is None else b, "b",
                         (self.out_features,))
        self.activation = canonical_activation(activation, allowed=DENSE_ACTIVATIONS,
                                               what="activation")

    @property
    def input_size(self):
        return self.in_features

    @property
    def output_size(self):
        return self.out_features

    state_size = 0

    def tensors(self):
        return {"W": self.W, "b": self.b}

    def config(self):
        return {
            "kind": "dense",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "activation": list(self.activation),
        }

    @property
    def num_parameters(self):
        return int(self.W.size + self.b.size)

    def __repr__(self):
        return (
            f"DenseLayer(in_features={self.in_features}, out_features={self.out_features}, "
            f"activation={self.activation[0]!r})"
        )


class GRUModel:
    """A frozen sequential stack of :class:`GRULayer` and :class:`DenseLayer`, at least one GRU.

    Parameters
    ----------
    layers : sequence of GRULayer or DenseLayer
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
        Sum of the GRU layers' hidden sizes: the length of one stream's flat state vector.
    state_slices : tuple of slice
        The slice of the state vector held by each GRU layer, in order.
    fingerprint : str
        SHA-256 over the layer configuration and the exact bytes of every tensor.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> gru = GRULayer(3, 8, rng.normal(size=(24, 3)), rng.normal(size=(24, 8)), linear_before_reset=1)
    >>> head = DenseLayer(8, 2, rng.normal(size=(2, 8)))
    >>> model = GRUModel([gru, head])
    >>> model.input_size, model.output_size, model.state_size
    (3, 2, 8)
    """

    def __init__(self, layers: Sequence, *, source: str | None = None, notes: Sequence = ()):
        if isinstance(layers, (GRULayer, DenseLayer)) or not isinstance(layers, Sequence):
            raise TypeError(
                f"layers: expected a list of GRULayer/DenseLayer, got {type(layers).__name__}"
            )
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers: expected at least one GRULayer, got an empty list")
        for i, layer in enumerate(layers):
            if not isinstance(layer, (GRULayer, DenseLayer)):
                raise TypeError(
                    f"layers[{i}]: expected a GRULayer or DenseLayer, got {type(layer).__name__}"
                )
        if not any(isinstance(layer, GRULayer) for layer in layers):
            raise ValueError("layers: expected at least one GRULayer, got only Dense layers")
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
            if isinstance(layer, GRULayer):
                slices.append(slice(off, off + layer.hidden_size))
                off += layer.hidden_size
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
    def gru_layers(self):
        return tuple(layer for layer in self._layers if isinstance(layer, GRULayer))

    @property
    def num_parameters(self):
        return sum(layer.num_parameters for layer in self._layers)

    @property
    def dtype(self):
        """The widest dtype among the stored tensors (float32 or float64)."""
        return np.result_type(*[t for layer in self._layers for t in layer.tensors().values()])

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
        lines = [f"GRUModel: input_size={self.input_size}, output_size={self.output_size}, "
                 f"state_size={self.state_size}, parameters={self.num_parameters}, "
                 f"dtype={self.dtype}" + (f", source={self.source}" if self.source else "")]
        lines += [f"  [{i}] {layer!r}" for i, layer in enumerate(self._layers)]
        return "\n".join(lines)

    def __repr__(self):
        return (
            f"GRUModel(layers={len(self._layers)}, input_size={self.input_size}, "
            f"output_size={self.output_size}, state_size={self.state_size})"
        )

    @classmethod
    def random(cls, input_size, hidden_sizes, *, dense_before=(), dense_after=(),
               linear_before_reset=1, seed=0, scale=None, dtype=np.float32):
        """A seeded random model, for tests, benchmarks and demos.

        Parameters
        ----------
        input_size : int
        hidden_sizes : int or sequence of int
            One GRU layer per entry.
        dense_before, dense_after : sequence of (width, activation)
            Dense layers before the first and after the last GRU layer.
        linear_before_reset : {0, 1}
        seed : int
        scale : float, optional
            Weight scale; defaults to PyTorch's ``1/sqrt(fan)`` initialisation.
        dtype : numpy dtype

        Examples
        --------
        >>> m = GRUModel.random(4, [16, 16], dense_after=[(3, "softmax")])
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
        for H in hidden_sizes:
            layers.append(GRULayer(width, H, u((3 * H, width), H), u((3 * H, H), H), u(3 * H, H),
                                   u(3 * H, H), linear_before_reset=linear_before_reset))
            width = H
        for out, act in dense_after:
            layers.append(DenseLayer(width, out, u((out, width), width), u(out, width), act))
            width = out
        return cls(layers, source="random")
