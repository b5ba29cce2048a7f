"""The LSTM layer and its canonical layout (what every converter must produce).

Gate order is ONNX's: **i (input), o (output), f (forget), c (cell candidate)**, stacked along the
first axis. ``H`` is ``hidden_size``, ``I`` ``input_size``, and ``H_out`` the width of ``h``:
``proj_size`` when the layer has a projection, ``H`` otherwise.

======  =======================  ================================================================
name    shape                    meaning
======  =======================  ================================================================
W       (4*H, I)                 input weights, rows [W_i; W_o; W_f; W_c]     (ONNX ``W[0]``)
R       (4*H, H_out)             recurrent weights, rows [R_i; R_o; R_f; R_c] (ONNX ``R[0]``)
Wb      (4*H,)                   input bias [Wb_i; Wb_o; Wb_f; Wb_c]          (ONNX ``B[0][:4H]``)
Rb      (4*H,)                   recurrent bias [Rb_i; Rb_o; Rb_f; Rb_c]      (ONNX ``B[0][4H:]``)
P       (3*H,) or None           peepholes [P_i; P_o; P_f]                    (ONNX ``P[0]``)
proj    (proj_size, H) or None   projection of h (PyTorch ``weight_hr``; no ONNX equivalent)
======  =======================  ================================================================

With ``f`` the gate activation (default sigmoid), ``g`` the cell-candidate activation (default
tanh), ``h`` the cell-output activation (default tanh), each a ``(name, alpha, beta)`` triple with
ONNX semantics; ``k(v) = clip(v, -clip, clip)`` when ``clip`` is set (identity otherwise); ``*``
elementwise; ``P_* = 0`` when ``P`` is None; ``C`` the cell state, ``h`` the hidden state (``f``,
``g``, ``h`` followed by parentheses are the activations, ``f_`` is the forget gate)::

    i  = f(k(W_i x + Wb_i + R_i h + Rb_i + P_i * C))
    f_ = f(k(W_f x + Wb_f + R_f h + Rb_f + P_f * C))     if input_forget == 0
    f_ = 1 - i                                           if input_forget == 1
    c~ = g(k(W_c x + Wb_c + R_c h + Rb_c))
    C' = f_ * C + i * c~
    o  = f(k(W_o x + Wb_o + R_o h + Rb_o + P_o * C'))
    u  = o * h(C')
    h' = u                                               if proj is None
    h' = proj u                                          otherwise (no bias, no activation)

These are the ONNX LSTM equations (``Ct``, ``Ht`` above are ``C'``, ``h'``), plus PyTorch's
projection. Points the ONNX text leaves open, fixed here as onnxruntime computes them (and
checked against it in ``tests/test_oracle.py``):

* ``clip`` clamps the full pre-activation of the gates i, f, o and of the candidate c~ (peephole
  term and both biases included), never the cell state: ``h(C')`` sees the unclipped ``C'``.
* The peepholes of i and f read the previous cell state ``C``; the output gate's reads the new
  ``C'``.
* ``input_forget=1`` couples the gates as ``f_ = 1 - i`` (after i's activation). The forget
  gate's rows of W, R, Wb, Rb and its peephole P_f are then unused (they stay in the layout so
  the tensors keep their shapes).

A stream's state for one LSTM layer is ``H_out + H`` values: ``h`` (``H_out`` wide) **followed
by** ``C`` (``H`` wide); its output is ``h'``. A model's state is the layers' states in layer
order. The engine runs it on every path (``kernels._lstm_cell``; :meth:`LSTMLayer.pack` says
how the products are laid out); the oracle, the native file and the converters take it.

For converter authors (the reorders live in :mod:`converters._util`):

* **PyTorch** ``nn.LSTM``/``nn.LSTMCell`` stores gate blocks in the order (i, f, g, o) in
  ``weight_ih`` (4H, I), ``weight_hh`` (4H, H_out), ``bias_ih``, ``bias_hh``; reorder the blocks to
  (i, o, f, g) (``converters._util.ifco_to_iofc``), g being our c~. ``bias_ih`` is ``Wb``,
  ``bias_hh`` is ``Rb`` (``bias=False``: both zero). Activations are always (sigmoid, tanh, tanh),
  no peepholes, no clip, ``input_forget=0``. ``proj_size > 0`` gives ``weight_hr_l{k}``
  (proj_size, H), which is ``proj`` as is; ``weight_hh`` is then (4H, proj_size), ``h0`` is
  (num_layers, N, proj_size), ``c0`` (num_layers, N, H), and layer k > 0 takes ``proj_size``
  inputs.
* **Keras** ``LSTM`` stores ``kernel`` (I, 4H) and ``recurrent_kernel`` (H, 4H) with gate blocks
  (i, f, c, o) along the columns: transpose, then the same reorder as PyTorch's
  (``converters._util.keras_lstm_tensors``). Its one bias (4H,) is ``Wb`` (same reorder), ``Rb``
  is zero. ``recurrent_activation`` is ``f``; ``activation`` is both ``g`` and ``h``.
  ``unit_forget_bias`` only initialises the bias and changes nothing at inference.
* **ONNX** ``LSTM``: W, R, B, P are the canonical tensors as they stand (B split in two halves);
  ``activations`` lists f, g, h (three per direction), with ``activation_alpha`` and
  ``activation_beta`` read as onnxruntime reads them (see ``converters._util``
  ``ONNX_RNN_ACTIVATIONS`` and ``tests/test_oracle.py``); ``initial_h``/``initial_c`` are the
  state's two halves.
"""

from __future__ import annotations

import numpy as np

from .. import kernels as K
from ..activations import LSTM_ACTIVATIONS, activation_id, canonical_activation
from .base import Layer, clip_value, flag, format_activation, size, weight

__all__ = ["LSTMLayer"]


class LSTMLayer(Layer):
    """One LSTM layer in the canonical layout (gate order i, o, f, c; see
    :mod:`streamgru.layers.lstm`).

    Parameters
    ----------
    input_size, hidden_size : int
        I and H.
    W : array_like, (4*hidden_size, input_size)
        Input weights, rows [W_i; W_o; W_f; W_c].
    R : array_like, (4*hidden_size, H_out)
        Recurrent weights, rows [R_i; R_o; R_f; R_c]; ``H_out`` is ``proj_size`` with a
        projection, else ``hidden_size``.
    Wb, Rb : array_like, (4*hidden_size,), optional
        Input and recurrent biases (zeros when omitted).
    P : array_like, (3*hidden_size,), optional
        Peepholes [P_i; P_o; P_f] (ONNX ``P``); None (default) is none.
    proj : array_like, (proj_size, hidden_size), optional
        Projection of h (PyTorch ``weight_hr``); required exactly when ``proj_size > 0``.
    proj_size : int
        0 (default): no projection.
    f, g, h : str or tuple, optional
        Gate, cell-candidate and cell-output activations (default ``"sigmoid"``, ``"tanh"``,
        ``"tanh"``), as a name or ``(name, alpha, beta)`` with ONNX semantics.
    clip : float or None
        ONNX cell clip: activation inputs are clamped to ``[-clip, clip]``. None (default) is off.
    input_forget : bool or {0, 1}
        1 couples the forget gate to the input gate: ``f_ = 1 - i`` (ONNX ``input_forget``).

    Examples
    --------
    >>> import numpy as np
    >>> H, I = 4, 3
    >>> layer = LSTMLayer(I, H, np.zeros((4 * H, I)), np.zeros((4 * H, H)))
    >>> layer.output_size, layer.state_size, sorted(layer.tensors())
    (4, 8, ['R', 'Rb', 'W', 'Wb'])
    >>> proj = LSTMLayer(I, H, np.zeros((4 * H, I)), np.zeros((4 * H, 2)), proj=np.zeros((2, H)),
    ...                  proj_size=2)
    >>> proj.output_size, proj.state_size
    (2, 6)
    >>> proj.describe()
    'lstm proj_size=2 f=sigmoid g=tanh h=tanh clip=off peepholes=no input_forget=0'
    """

    kind = "lstm"
    recurrent = True

    def __init__(self, input_size, hidden_size, W, R, Wb=None, Rb=None, P=None, proj=None, *,
                 proj_size=0, f="sigmoid", g="tanh", h="tanh", clip=None, input_forget=0):
        I = size(input_size, "input_size")
        H = size(hidden_size, "hidden_size")
        if isinstance(proj_size, bool) or not isinstance(proj_size, (int, np.integer)):
            raise TypeError(f"proj_size: expected an int >= 0 (0: no projection), got {proj_size!r}")
        if proj_size < 0:
            raise ValueError(f"proj_size: expected an int >= 0 (0: no projection), got {proj_size}")
        proj_size = int(proj_size)
        if (proj is None) != (proj_size == 0):
            raise ValueError(
                f"proj: expected an array of shape ({proj_size}, {H}) when proj_size > 0 and None "
                f"when proj_size == 0, got {'None' if proj is None else 'an array'} with "
                f"proj_size={proj_size}"
            )
        self.input_size = I
        self.hidden_size = H
        self.proj_size = proj_size
        H_out = proj_size or H
        self.W = weight(W, "W", (4 * H, I))
        self.R = weight(R, "R", (4 * H, H_out))
        dt = np.result_type(self.W, self.R)
        self.Wb = weight(np.zeros(4 * H, dt) if Wb is None else Wb, "Wb", (4 * H,))
        self.Rb = weight(np.zeros(4 * H, dt) if Rb is None else Rb, "Rb", (4 * H,))
        self.P = None if P is None else weight(P, "P", (3 * H,))
        self.proj = None if proj is None else weight(proj, "proj", (proj_size, H))
        self.f = canonical_activation(f, allowed=LSTM_ACTIVATIONS, what="f")
        self.g = canonical_activation(g, allowed=LSTM_ACTIVATIONS, what="g")
        self.h = canonical_activation(h, allowed=LSTM_ACTIVATIONS, what="h")
        self.clip = clip_value(clip)
        self.input_forget = flag(input_forget, "input_forget")

    @property
    def output_size(self):
        """The width of h: ``proj_size`` with a projection, else ``hidden_size``."""
        return self.proj_size or self.hidden_size

    @property
    def state_size(self):
        """h then C: ``output_size + hidden_size`` values per stream."""
        return self.output_size + self.hidden_size

    @property
    def state_parts(self):
        """h (``output_size``) then C (``hidden_size``)."""
        return (("h", self.output_size), ("C", self.hidden_size))

    def tensors(self):
        """The weight tensors by name, in the canonical layout (``P``, ``proj`` only when set)."""
        out = {"W": self.W, "R": self.R, "Wb": self.Wb, "Rb": self.Rb}
        if self.P is not None:
            out["P"] = self.P
        if self.proj is not None:
            out["proj"] = self.proj
        return out

    def config(self):
        """JSON-ready description of everything but the tensors."""
        return {
            "kind": "lstm",
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "proj_size": self.proj_size,
            "peepholes": self.P is not None,
            "f": list(self.f),
            "g": list(self.g),
            "h": list(self.h),
            "clip": self.clip,
            "input_forget": self.input_forget,
        }

    @classmethod
    def from_config(cls, cfg, tensors):
        """The layer of ``config()`` and ``tensors()`` (the native file's round trip).

        The tensor names must be exactly those the configuration implies: a peephole or
        projection tensor the configuration does not announce (or the reverse) is refused, never
        dropped.
        """
        want = {"W", "R", "Wb", "Rb"} | ({"P"} if cfg["peepholes"] else set()) \
            | ({"proj"} if cfg["proj_size"] else set())
        if set(tensors) != want:
            raise ValueError(f"tensors: expected {sorted(want)} for this configuration, got "
                             f"{sorted(tensors)}")
        return cls(cfg["input_size"], cfg["hidden_size"], tensors["W"], tensors["R"],
                   tensors["Wb"], tensors["Rb"], tensors.get("P"), tensors.get("proj"),
                   proj_size=cfg["proj_size"], f=tuple(cfg["f"]), g=tuple(cfg["g"]),
                   h=tuple(cfg["h"]), clip=cfg["clip"], input_forget=cfg["input_forget"])

    @property
    def macs(self):
        return int(self.W.size) + self.recurrent_macs

    @property
    def recurrent_macs(self):
        # Everything after the input product reads the previous step's h or C: R, the peepholes
        # and the projection (whose output is the next step's h).
        extra = sum(int(t.size) for t in (self.P, self.proj) if t is not None)
        return int(self.R.size) + extra

    runnable = True

    def pack(self, row):
        """The LSTM's table row: input product W, recurrent product R (over h), the projection
        as the T_RN product (over u = o * h(C'), between the two halves of the cell), the
        peepholes as a vector in params, activations f, g, h, clip and input_forget."""
        H, ho = self.hidden_size, self.output_size
        row.row[K.T_KIND] = K.KIND_LSTM
        row.product(K.T_W, self.W, self.Wb)
        row.product(K.T_R, self.R, self.Rb)
        if self.proj is not None:
            row.product(K.T_RN, self.proj, None)
        if self.P is not None:
            row.vector(K.T_PEEP, self.P)
        else:
            row.row[K.T_PEEP] = -1
        row.row[K.T_HID] = H
        row.row[K.T_SW] = ho + H
        row.row[K.T_IFG] = self.input_forget
        row.row[K.T_F] = activation_id(self.f[0])
        row.row[K.T_G] = activation_id(self.g[0])
        row.row[K.T_H] = activation_id(self.h[0])
        row.fp[[K.F_FA, K.F_FB, K.F_GA, K.F_GB, K.F_HA, K.F_HB]] = [
            self.f[1], self.f[2], self.g[1], self.g[2], self.h[1], self.h[2]]
        row.fp[K.F_CLIP] = 0.0 if self.clip is None else self.clip
        # gates: W x and R h (4H each; the projection's output, H_out, lands in GH too);
        # hidden: the state (h then C) in the sequence kernels' workspace, and u (H wide).
        row.need(width=ho, gates=max(4 * H, ho), hidden=ho + H)

    def describe(self):
        clip = "off" if self.clip is None else self.clip
        return (f"lstm proj_size={self.proj_size} f={format_activation(self.f)} "
                f"g={format_activation(self.g)} h={format_activation(self.h)} clip={clip} "
                f"peepholes={'yes' if self.P is not None else 'no'} "
                f"input_forget={self.input_forget}")

    def __repr__(self):
        extra = f", proj_size={self.proj_size}" if self.proj_size else ""
        extra += ", peepholes=True" if self.P is not None else ""
        extra += f", clip={self.clip}" if self.clip is not None else ""
        extra += ", input_forget=1" if self.input_forget else ""
        return (f"LSTMLayer(input_size={self.input_size}, hidden_size={self.hidden_size}{extra}, "
                f"f={self.f[0]!r}, g={self.g[0]!r}, h={self.h[0]!r})")
