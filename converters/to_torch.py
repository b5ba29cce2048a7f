"""Export a :class:`streamgru.Model` as a PyTorch module of one time step for a batch of streams.

``to_torch(model)(x, state) -> (y, state_out)`` with ``x`` (batch, input_size), ``state`` and
``state_out`` (batch, state_size): the recurrent layers' states concatenated in layer order
(``model.state_slices``: a GRU layer's h, an LSTM layer's h then C), the engine's layout of a
stream's state.

A GRU layer torch can run natively (sigmoid and tanh, ``linear_before_reset=1``, no ``clip``) is an
``nn.GRUCell`` holding the weights in PyTorch's gate order (r, z, n), so a user gets torch's own
kernel. Any other GRU layer (other activations with their alpha/beta, ``clip``,
``linear_before_reset=0``) is a small module that computes the canonical equations of
:mod:`streamgru.layers.gru` with torch operations, on the canonical layout. A Dense layer is an
``nn.Linear`` followed by its activation. An LSTM layer torch can run natively (sigmoid, tanh,
tanh, no peepholes, no ``clip``, ``input_forget=0``) is an ``nn.LSTMCell``, or with a projection
a one-layer ``nn.LSTM(proj_size=...)`` run on one step, holding the weights in PyTorch's gate
order (i, f, g, o); any other is a module computing the equations of
:mod:`streamgru.layers.lstm`. The module has the model's dtype (float32 or float64).
Each layer kind has one function in :data:`_LAYER_MODULES`; a kind without one is refused.

``converters.verify(model, to_torch(model))`` runs the module as the reference, one call per step.
"""

from __future__ import annotations

import numpy as np

from streamgru.model import GRUModel

from ._util import exported_kinds, iofc_to_ifco, require, swap_rz

__all__ = ["to_torch"]


def to_torch(model):
    """Export ``model`` as an ``nn.Module`` with ``forward(x, state) -> (y, state_out)``.

    Parameters
    ----------
    model : GRUModel

    Returns
    -------
    torch.nn.Module
        In eval mode, in the model's dtype; ``x`` (batch, input_size) and ``state`` (batch,
        state_size) in, ``y`` (batch, output_size) and ``state_out`` (batch, state_size) out.

    Examples
    --------
    >>> import torch
    >>> from streamgru import GRUModel
    >>> from converters import to_torch
    >>> net = to_torch(GRUModel.random(3, [8, 4], dense_after=[(2, "softmax")]))
    >>> y, state = net(torch.ones(5, 3), torch.zeros(5, 12))
    >>> tuple(y.shape), tuple(state.shape)
    ((5, 2), (5, 12))
    """
    torch = require("torch", "torch")
    if not isinstance(model, GRUModel):
        raise TypeError(f"model: expected a GRUModel, got {type(model).__name__}")
    dtype = torch.float64 if model.dtype == np.float64 else torch.float32
    np_dtype = model.dtype

    def tensor(a):
        return torch.nn.Parameter(torch.from_numpy(np.array(a, np_dtype)), requires_grad=False)

    exported_kinds(model, _LAYER_MODULES, "to_torch")
    layers = [_LAYER_MODULES[layer.kind](torch, layer, tensor, dtype) for layer in model.layers]
    widths = [layer.state_size for layer in model.layers]
    return _classes(torch)["step"](layers, widths).eval()


def _gru_module(torch, layer, tensor, dtype):
    if _native(layer):
        cell = torch.nn.GRUCell(layer.input_size, layer.hidden_size, dtype=dtype)
        # Canonical (z, r, n) -> PyTorch's (r, z, n): the same swap as the importer's.
        cell.weight_ih, cell.weight_hh = tensor(swap_rz(layer.W)), tensor(swap_rz(layer.R))
        cell.bias_ih, cell.bias_hh = tensor(swap_rz(layer.Wb)), tensor(swap_rz(layer.Rb))
        return cell
    return _classes(torch)["gru"](layer, tensor)


def _dense_module(torch, layer, tensor, dtype):
    linear = torch.nn.Linear(layer.in_features, layer.out_features, dtype=dtype)
    linear.weight, linear.bias = tensor(layer.W), tensor(layer.b)
    return torch.nn.Sequential(linear, _classes(torch)["act"](layer.activation))


def _lstm_module(torch, layer, tensor, dtype):
    return _classes(torch)["lstm"](layer, tensor, dtype)


def _native(layer):
    return (layer.f[0] == "sigmoid" and layer.g[0] == "tanh" and layer.linear_before_reset == 1
            and layer.clip is None)


def _native_lstm(layer):
    return ((layer.f[0], layer.g[0], layer.h[0]) == ("sigmoid", "tanh", "tanh")
            and layer.P is None and layer.clip is None and layer.input_forget == 0)


_CLASSES = {}


def _classes(torch):
    """The module classes, defined once on first use so that importing this module needs no torch."""
    if _CLASSES:
        return _CLASSES
    nn = torch.nn

    class Activation(nn.Module):
        """One activation of :mod:`streamgru.activations`, with its alpha and beta."""

        def __init__(self, spec):
            super().__init__()
            self.name, self.alpha, self.beta = spec

        def forward(self, v):
            name, alpha, beta = self.name, self.alpha, self.beta
            if name == "identity":
                return v
            if name == "sigmoid":
                return torch.sigmoid(v)
            if name == "tanh":
                return torch.tanh(v)
            if name == "relu":
                return torch.relu(v)
            if name == "hardsigmoid":
                return torch.clamp(alpha * v + beta, 0.0, 1.0)
            if name == "leakyrelu":
                return torch.where(v >= 0, v, alpha * v)
            if name == "affine":
                return alpha * v + beta
            if name == "thresholdedrelu":
                return torch.where(v > alpha, v, torch.zeros_like(v))
            if name == "scaledtanh":
                return alpha * torch.tanh(beta * v)
            if name == "elu":
                return torch.where(v >= 0, v, alpha * torch.expm1(torch.clamp(v, max=0.0)))
            if name == "softsign":
                return v / (1.0 + torch.abs(v))
            if name == "softplus":
                return torch.logaddexp(v, torch.zeros_like(v))
            if name == "softmax":
                return torch.softmax(v, dim=-1)
            raise ValueError(f"activation: expected a streamgru activation, got {name!r}")

        def extra_repr(self):
            return f"{self.name}, alpha={self.alpha}, beta={self.beta}"

    class GRUStep(nn.Module):
        """A GRU layer in the canonical layout (z, r, n), any activations, clip and
        linear_before_reset: the equations of streamgru.layers.gru, written with torch operations."""

        def __init__(self, layer, tensor):
            super().__init__()
            self.hidden_size = layer.hidden_size
            self.linear_before_reset = layer.linear_before_reset
            self.clip = layer.clip
            self.W, self.R = tensor(layer.W), tensor(layer.R)  # (3H, I), (3H, H)
            self.Wb, self.Rb = tensor(layer.Wb), tensor(layer.Rb)  # (3H,)
            self.f, self.g = Activation(layer.f), Activation(layer.g)

        def _c(self, v):
            return v if self.clip is None else torch.clamp(v, -self.clip, self.clip)

        def forward(self, x, h):
            H = self.hidden_size
            gx = x @ self.W.T + self.Wb  # (batch, 3H)
            R, Rb = self.R, self.Rb
            z = self.f(self._c(gx[:, :H] + h @ R[:H].T + Rb[:H]))
            r = self.f(self._c(gx[:, H:2 * H] + h @ R[H:2 * H].T + Rb[H:2 * H]))
            if self.linear_before_reset:
                n = self.g(self._c(gx[:, 2 * H:] + r * (h @ R[2 * H:].T + Rb[2 * H:])))
            else:
                n = self.g(self._c(gx[:, 2 * H:] + (r * h) @ R[2 * H:].T + Rb[2 * H:]))
            return (1.0 - z) * n + z * h

    class LSTMStep(nn.Module):
        """An LSTM layer: ``forward(x, s) -> (h', [h'; C'])`` with ``s`` its state columns, h
        (output_size) then C (hidden_size). Torch's own ``nn.LSTMCell``/``nn.LSTM`` when it runs
        the layer, else the equations of streamgru.layers.lstm on the canonical layout."""

        def __init__(self, layer, tensor, dtype):
            super().__init__()
            I, H, P = layer.input_size, layer.hidden_size, layer.proj_size
            self.width = layer.output_size  # of h, the first columns of the state
            self.cell = self.lstm = None
            if _native_lstm(layer):
                # Canonical (i, o, f, c) -> PyTorch's (i, f, g, o): the importer's reorder undone.
                if P:
                    mod = self.lstm = nn.LSTM(I, H, proj_size=P, dtype=dtype)
                    sfx = "_l0"
                    mod.weight_hr_l0 = tensor(layer.proj)
                else:
                    mod = self.cell = nn.LSTMCell(I, H, dtype=dtype)
                    sfx = ""
                for role, t in (("weight_ih", layer.W), ("weight_hh", layer.R),
                                ("bias_ih", layer.Wb), ("bias_hh", layer.Rb)):
                    setattr(mod, role + sfx, tensor(iofc_to_ifco(t)))
                return
            self.clip, self.input_forget = layer.clip, layer.input_forget
            self.W, self.R = tensor(layer.W), tensor(layer.R)  # (4H, I), (4H, H_out)
            self.Wb, self.Rb = tensor(layer.Wb), tensor(layer.Rb)  # (4H,)
            zeros = np.zeros(3 * H, layer.W.dtype)
            self.P = tensor(zeros if layer.P is None else layer.P)  # (3H,)
            self.proj = None if layer.proj is None else tensor(layer.proj)  # (proj_size, H)
            self.f, self.g, self.h = Activation(layer.f), Activation(layer.g), Activation(layer.h)

        def _k(self, v):
            return v if self.clip is None else torch.clamp(v, -self.clip, self.clip)

        def forward(self, x, s):
            h, c = s[:, :self.width], s[:, self.width:]
            if self.cell is not None:
                h, c = self.cell(x, (h, c))
            elif self.lstm is not None:
                _, (h, c) = self.lstm(x[None], (h[None], c[None]))
                h, c = h[0], c[0]
            else:
                z = x @ self.W.T + self.Wb + h @ self.R.T + self.Rb  # (batch, 4H): i, o, f, c
                zi, zo, zf, zc = torch.chunk(z, 4, dim=1)
                pi, po, pf = torch.chunk(self.P, 3)
                i = self.f(self._k(zi + pi * c))
                f = 1.0 - i if self.input_forget else self.f(self._k(zf + pf * c))
                c = f * c + i * self.g(self._k(zc))
                h = self.f(self._k(zo + po * c)) * self.h(c)
                if self.proj is not None:
                    h = h @ self.proj.T
            return h, torch.cat([h, c], dim=1)

    class StreamgruStep(nn.Module):
        """One step of a GRUModel: ``forward(x, state) -> (y, state_out)`` (see to_torch)."""

        def __init__(self, layers, state_widths):
            super().__init__()
            self.layers = nn.ModuleList(layers)
            self.state_widths = list(state_widths)  # per layer, 0 for a stateless one

        def forward(self, x, state):
            hs = iter(torch.split(state, [w for w in self.state_widths if w], dim=1))
            new, v = [], x
            for layer, width in zip(self.layers, self.state_widths):
                if width:  # a GRU layer's state is its output; an LSTM layer returns both
                    out = layer(v, next(hs))
                    v, s = out if isinstance(out, tuple) else (out, out)
                    new.append(s)
                else:
                    v = layer(v)
            return v, torch.cat(new, dim=1)

    _CLASSES.update(act=Activation, gru=GRUStep, lstm=LSTMStep, step=StreamgruStep)
    return _CLASSES


#: layer kind -> f(torch, layer, tensor, dtype) -> the layer's module.
_LAYER_MODULES = {"gru": _gru_module, "dense": _dense_module, "lstm": _lstm_module}
