"""The GRU layer and its canonical layout (what every converter must produce).

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

These are exactly the ONNX GRU equations. The layer's per-stream state is h (``state_size`` H)
and its output is h'. For converter authors:

* **PyTorch** ``nn.GRU``/``nn.GRUCell`` stores gates in the order (r, z, n); swap the first two
  blocks of ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``. PyTorch is
  ``linear_before_reset=1``; its ``b_hn`` is ``Rb_n``.
* **Keras** ``GRU`` stores ``kernel`` as (I, 3H) and ``recurrent_kernel`` as (H, 3H) in the order
  (z, r, h): transpose, no reordering. ``reset_after=True`` is ``linear_before_reset=1`` with
  bias shape (2, 3H) = [Wb; Rb]; ``reset_after=False`` is ``linear_before_reset=0`` with a single
  bias (3H,) = Wb and Rb = 0.
"""

from __future__ import annotations

import numpy as np

from .. import kernels as K
from ..activations import GRU_ACTIVATIONS, activation_id, canonical_activation
from .base import Layer, clip_value, flag, format_activation, size, weight

__all__ = ["GRULayer"]


class GRULayer(Layer):
    """One GRU layer in the canonical layout (gate order z, r, n; see :mod:`streamgru.layers.gru`).

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
    >>> layer.state_size, layer.describe()
    (4, 'gru  linear_before_reset=1 f=sigmoid g=tanh clip=off')
    """

    kind = "gru"
    recurrent = True

    def __init__(self, input_size, hidden_size, W, R, Wb=None, Rb=None, *, linear_before_reset,
                 f="sigmoid", g="tanh", clip=None):
        I = size(input_size, "input_size")
        H = size(hidden_size, "hidden_size")
        self.input_size = I
        self.hidden_size = H
        self.W = weight(W, "W", (3 * H, I))
        self.R = weight(R, "R", (3 * H, H))
        dt = np.result_type(self.W, self.R)
        self.Wb = weight(np.zeros(3 * H, dt) if Wb is None else Wb, "Wb", (3 * H,))
        self.Rb = weight(np.zeros(3 * H, dt) if Rb is None else Rb, "Rb", (3 * H,))
        self.linear_before_reset = flag(linear_before_reset, "linear_before_reset")
        self.f = canonical_activation(f, allowed=GRU_ACTIVATIONS, what="f")
        self.g = canonical_activation(g, allowed=GRU_ACTIVATIONS, what="g")
        self.clip = clip_value(clip)

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

    @classmethod
    def from_config(cls, cfg, tensors):
        """The layer of ``config()`` and ``tensors()`` (the native file's round trip)."""
        return cls(cfg["input_size"], cfg["hidden_size"], tensors["W"], tensors["R"],
                   tensors["Wb"], tensors["Rb"], linear_before_reset=cfg["linear_before_reset"],
                   f=tuple(cfg["f"]), g=tuple(cfg["g"]), clip=cfg["clip"])

    @property
    def macs(self):
        return int(self.W.size + self.R.size)

    @property
    def recurrent_macs(self):
        return int(self.R.size)

    runnable = True

    def pack(self, row):
        """The GRU's table row: input product W, recurrent product R (linear_before_reset=0:
        R_z|R_r, then R_n over r * h as the T_RN product), activations f, g and clip."""
        H = self.hidden_size
        row.row[K.T_KIND] = K.KIND_GRU
        row.product(K.T_W, self.W, self.Wb)
        if self.linear_before_reset == 1:
            row.product(K.T_R, self.R, self.Rb)
        else:
            row.product(K.T_R, self.R[:2 * H], self.Rb[:2 * H])
            row.product(K.T_RN, self.R[2 * H:], self.Rb[2 * H:])
        row.row[K.T_F] = activation_id(self.f[0])
        row.row[K.T_G] = activation_id(self.g[0])
        row.row[K.T_LBR] = self.linear_before_reset
        row.row[K.T_SW] = H
        row.row[K.T_HID] = H  # the R_n product's input, r * h
        row.fp[[K.F_FA, K.F_FB, K.F_GA, K.F_GB]] = [self.f[1], self.f[2], self.g[1], self.g[2]]
        row.fp[K.F_CLIP] = 0.0 if self.clip is None else self.clip
        row.need(width=H, gates=3 * H, hidden=H)

    def describe(self):
        clip = "off" if self.clip is None else self.clip
        return (f"gru  linear_before_reset={self.linear_before_reset} "
                f"f={format_activation(self.f)} g={format_activation(self.g)} clip={clip}")

    def __repr__(self):
        extra = f", clip={self.clip}" if self.clip is not None else ""
        return (
            f"GRULayer(input_size={self.input_size}, hidden_size={self.hidden_size}, "
            f"linear_before_reset={self.linear_before_reset}, f={self.f[0]!r}, g={self.g[0]!r}{extra})"
        )
