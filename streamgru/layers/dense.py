"""The Dense layer: ``y = act(W x + b)``, applied to every step independently; no state.

======  =====================  ===========================================================
name    shape                  meaning
======  =====================  ===========================================================
W       (out, in)              PyTorch ``nn.Linear`` layout (Keras ``Dense.kernel`` transposed)
b       (out,)                 bias
======  =====================  ===========================================================
"""

from __future__ import annotations

import numpy as np

from .. import kernels as K
from ..activations import DENSE_ACTIVATIONS, activation_id, canonical_activation
from .base import Layer, format_activation, size, weight

__all__ = ["DenseLayer"]


class DenseLayer(Layer):
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
        self.in_features = size(in_features, "in_features")
        self.out_features = size(out_features, "out_features")
        self.W = weight(W, "W", (self.out_features, self.in_features))
        self.b = weight(np.zeros(self.out_features, self.W.dtype) if b is None else b, "b",
                        (self.out_features,))
        self.activation = canonical_activation(activation, allowed=DENSE_ACTIVATIONS,
                                               what="activation")

    @property
    def input_size(self):
        return self.in_features

    @property
    def output_size(self):
        return self.out_features

    def tensors(self):
        return {"W": self.W, "b": self.b}

    def config(self):
        return {
            "kind": "dense",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "activation": list(self.activation),
        }

    @classmethod
    def from_config(cls, cfg, tensors):
        """The layer of ``config()`` and ``tensors()`` (the native file's round trip)."""
        return cls(cfg["in_features"], cfg["out_features"], tensors["W"], tensors["b"],
                   tuple(cfg["activation"]))

    @property
    def macs(self):
        return int(self.W.size)

    runnable = True

    def pack(self, row):
        """The Dense table row: its product, which lands in its output region (T_XOUT: the cell
        only activates it in place), and its activation."""
        row.row[K.T_KIND] = K.KIND_DENSE
        row.product(K.T_W, self.W, self.b)
        row.row[K.T_XOUT] = 1
        row.row[K.T_F] = activation_id(self.activation[0])
        row.fp[[K.F_FA, K.F_FB]] = [self.activation[1], self.activation[2]]
        row.need(width=self.output_size)

    def describe(self):
        return f"dense activation={format_activation(self.activation)}"

    def __repr__(self):
        return (
            f"DenseLayer(in_features={self.in_features}, out_features={self.out_features}, "
            f"activation={self.activation[0]!r})"
        )
