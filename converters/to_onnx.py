"""Export a :class:`streamgru.Model` as an ONNX graph of one time step for a batch of streams.

The graph is what a user of onnxruntime runs around a state store of their own: it takes the
rows of this call and their states, and returns the outputs and the new states. Every GRU layer
is one ONNX ``GRU`` node run on a sequence of length 1 (the canonical layout is ONNX's, so the
tensors are copied without reordering: ``W[None]``, ``R[None]``, ``B = [Wb; Rb][None]``), with
its activations, their alpha/beta, ``clip`` and ``linear_before_reset``; every LSTM layer is one
ONNX ``LSTM`` node the same way (``P[None]`` when it has peepholes, ``input_forget``, three
activations), its state columns split into ``initial_h`` and ``initial_c``; every Dense layer is
``MatMul`` + ``Add`` + its activation. An LSTM layer with a projection (``proj_size > 0``) is
refused: ONNX's ``LSTM`` has no projection, and a ``MatMul`` after the node cannot add one, since
the node's recurrence reads its own unprojected h.

Graph signature (float32)::

    x          (batch, input_size)      one row per stream of this call
    state      (batch, state_size)      the streams' states: the recurrent layers' states
                                        concatenated in layer order (``model.state_slices``)
    y          (batch, output_size)
    state_out  (batch, state_size)      the new states, same layout

With ``sequence=True`` the graph advances every stream over a whole sequence in one call:
``x`` is (time, batch, input_size), ``y`` is (time, batch, output_size) and ``state_out`` is the
state after the last step.

onnxruntime reads ``activation_alpha``/``activation_beta`` in order, one value per activation
that takes the parameter, and its defaults differ from the ONNX operators' for Affine, ScaledTanh
and ThresholdedRelu (see :mod:`converters.from_onnx`): the export writes every value explicitly,
so no default is ever relied on.

The graph is float32 (``dtype="float32"``, the only value): onnxruntime's ``GRU`` operator has
no float64 kernel (a double graph fails at run time with "GRU operator does not support double
yet"), so a float64 model's weights are rounded to float32, as ``Engine(model)`` rounds them by
default, and ``dtype="float64"`` is refused; :func:`converters.to_torch` exports a float64 step.

Each layer kind has one function in :data:`_LAYER_NODES` that appends its nodes; a kind without
one is refused naming the layer.
"""

from __future__ import annotations

import numpy as np

from streamgru.model import GRUModel

from ._util import ONNX_RNN_ACTIVATIONS, UnsupportedModelError, exported_kinds, require

__all__ = ["to_onnx"]

# Dense activations that are one ONNX operator, with the attributes taken from the triple.
_DENSE_OPS = {
    "relu": ("Relu", ()),
    "tanh": ("Tanh", ()),
    "sigmoid": ("Sigmoid", ()),
    "softsign": ("Softsign", ()),
    "softplus": ("Softplus", ()),
    "leakyrelu": ("LeakyRelu", ("alpha",)),
    "elu": ("Elu", ("alpha",)),
    "thresholdedrelu": ("ThresholdedRelu", ("alpha",)),
    "hardsigmoid": ("HardSigmoid", ("alpha", "beta")),
}

# onnxruntime 1.17 .. 1.31 read IR versions up to 10.
_IR_VERSION = 10


def to_onnx(model, path=None, opset=17, *, sequence=False, dtype="float32"):
    """Export ``model`` as an ONNX graph: ``(x, state) -> (y, state_out)`` for a batch.

    Parameters
    ----------
    model : GRUModel
    path : str or os.PathLike, optional
        Where to write the ``.onnx`` file. None (default): only return the graph.
    opset : int
        ONNX opset of the default domain, 14 or later (``GRU`` with ``layout``; ``Squeeze`` and
        ``Unsqueeze`` taking axes as an input).
    sequence : bool
        False (default): one step, ``x`` (batch, input_size). True: ``x`` (time, batch,
        input_size), every step's output, the state after the last step.

    dtype : {"float32"}
        The graph's dtype: a float64 model's weights are rounded to float32. "float64" is
        refused (onnxruntime cannot run a float64 ``GRU``; see the module docstring).

    Returns
    -------
    onnx.ModelProto
        Checked with ``onnx.checker``; float32.

    Raises
    ------
    ValueError
        ``dtype`` other than "float32".
    UnsupportedModelError
        A layer kind this exporter does not map.

    Examples
    --------
    >>> import numpy as np, onnxruntime as ort
    >>> from streamgru import GRUModel
    >>> from converters import to_onnx
    >>> model = GRUModel.random(3, [8, 4], dense_after=[(2, "softmax")])
    >>> sess = ort.InferenceSession(to_onnx(model).SerializeToString())
    >>> y, state = sess.run(None, {"x": np.ones((5, 3), np.float32),
    ...                            "state": np.zeros((5, 12), np.float32)})
    >>> y.shape, state.shape
    ((5, 2), (5, 12))
    """
    onnx = require("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper

    if not isinstance(model, GRUModel):
        raise TypeError(f"model: expected a GRUModel, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise TypeError(f"opset: expected an int, got {opset!r}")
    if opset < 14:
        raise ValueError(f"opset: expected 14 or later (Squeeze/Unsqueeze axes as inputs, GRU "
                         f"layout), got {opset}")
    if not isinstance(sequence, (bool, np.bool_)):
        raise TypeError(f"sequence: expected a bool, got {sequence!r}")
    exported_kinds(model, _LAYER_NODES, "to_onnx")
    for i, layer in enumerate(model.layers):
        if getattr(layer, "proj_size", 0):
            raise UnsupportedModelError(
                f"model: layers[{i}] is an LSTM layer with proj_size={layer.proj_size}, which "
                f"to_onnx does not export: ONNX's LSTM operator has no projection, and its "
                f"recurrence reads the unprojected h, so no node after it can add one; use "
                f"converters.to_torch(model)"
            )
    try:
        dt = None if dtype is None else np.dtype(dtype)
    except TypeError:
        dt = None
    if dt == np.float64:
        raise ValueError(f"dtype: expected 'float32', got {dtype!r}; onnxruntime's GRU operator "
                         f"has no float64 kernel, so a float64 graph could not run: export "
                         f"float32, or use converters.to_torch(model) for a float64 step")
    if dt != np.float32:
        raise ValueError(f"dtype: expected 'float32', got {dtype!r}")
    model = model.astype("float32")  # rounds a float64 model's weights; a copy otherwise

    g = _Graph(helper, numpy_helper)
    node, const = g.node, g.const
    lead = ["time", "batch"] if sequence else ["batch"]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, lead + [model.input_size]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT,
                                            ["batch", model.state_size])]
    # The data path runs on (time, batch, features); one step is time = 1.
    cur = "x" if sequence else node("Unsqueeze", ["x", g.axis0], "x_seq")
    state_parts, slices = [], iter(model.state_slices)
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}"
        h = None
        if layer.state_size:  # this layer's columns of the state input
            sl = next(slices)
            start = const(f"{prefix}.start", np.array([sl.start], np.int64))
            stop = const(f"{prefix}.stop", np.array([sl.stop], np.int64))
            h = node("Slice", ["state", start, stop, g.axis1], f"{prefix}.h")
        cur, h_out = _LAYER_NODES[layer.kind](g, layer, prefix, cur, h)
        if h_out is not None:
            state_parts.append(h_out)
    node("Identity" if sequence else "Squeeze", [cur] if sequence else [cur, g.axis0], "y")
    node("Concat", state_parts, "state_out", axis=1)
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, lead + [model.output_size]),
               helper.make_tensor_value_info("state_out", TensorProto.FLOAT,
                                             ["batch", model.state_size])]
    graph = helper.make_graph(g.nodes, "streamgru_sequence" if sequence else "streamgru_step",
                              inputs, outputs, g.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset))],
                                   ir_version=_IR_VERSION, producer_name="streamgru")
    onnx.checker.check_model(onnx_model)
    if path is not None:
        onnx.save_model(onnx_model, path)
    return onnx_model


class _Graph:
    """The nodes and initializers of the graph being built, and the two axis constants."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits = [], []
        self.axis0 = self.const("axis0", np.array([0], np.int64))
        self.axis1 = self.const("axis1", np.array([1], np.int64))

    def const(self, name, value):
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op, inputs, output, **attrs):
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _gru_nodes(g, layer, prefix, cur, h):
    """One ONNX ``GRU`` node on the (time, batch, I) data ``cur`` from the layer's state columns
    ``h`` (batch, H); returns (its output sequence, its new state (batch, H))."""
    h0 = g.node("Unsqueeze", [h, g.axis0], f"{prefix}.initial_h")
    W = g.const(f"{prefix}.W", layer.W[None])
    R = g.const(f"{prefix}.R", layer.R[None])
    B = g.const(f"{prefix}.B", np.concatenate([layer.Wb, layer.Rb])[None])
    g.nodes.append(g.helper.make_node("GRU", [cur, W, R, B, "", h0],
                                      [f"{prefix}.Y", f"{prefix}.Y_h"], name=f"{prefix}.gru",
                                      **_gru_attributes(layer)))
    # Y: (time, num_directions=1, batch, H); Y_h: (1, batch, H).
    out = g.node("Squeeze", [f"{prefix}.Y", g.axis1], f"{prefix}.out")
    return out, g.node("Squeeze", [f"{prefix}.Y_h", g.axis0], f"{prefix}.h_out")


def _lstm_nodes(g, layer, prefix, cur, s):
    """One ONNX ``LSTM`` node on the (time, batch, I) data ``cur`` from the layer's state columns
    ``s`` (batch, 2H): h then C; returns (its output sequence, its new state [h; C])."""
    H = layer.hidden_size
    mid = g.const(f"{prefix}.mid", np.array([H], np.int64))
    end = g.const(f"{prefix}.end", np.array([2 * H], np.int64))
    h0 = g.node("Slice", [s, g.const(f"{prefix}.zero", np.array([0], np.int64)), mid, g.axis1],
                f"{prefix}.h0")
    c0 = g.node("Slice", [s, mid, end, g.axis1], f"{prefix}.c0")
    h0 = g.node("Unsqueeze", [h0, g.axis0], f"{prefix}.initial_h")
    c0 = g.node("Unsqueeze", [c0, g.axis0], f"{prefix}.initial_c")
    W = g.const(f"{prefix}.W", layer.W[None])
    R = g.const(f"{prefix}.R", layer.R[None])
    B = g.const(f"{prefix}.B", np.concatenate([layer.Wb, layer.Rb])[None])
    P = "" if layer.P is None else g.const(f"{prefix}.P", layer.P[None])
    attrs = {"hidden_size": H, "input_forget": layer.input_forget,
             **_activation_attributes((layer.f, layer.g, layer.h), ["Sigmoid", "Tanh", "Tanh"])}
    if layer.clip is not None:
        attrs["clip"] = float(layer.clip)
    g.nodes.append(g.helper.make_node("LSTM", [cur, W, R, B, "", h0, c0, P],
                                      [f"{prefix}.Y", f"{prefix}.Y_h", f"{prefix}.Y_c"],
                                      name=f"{prefix}.lstm", **attrs))
    # Y: (time, num_directions=1, batch, H); Y_h, Y_c: (1, batch, H).
    out = g.node("Squeeze", [f"{prefix}.Y", g.axis1], f"{prefix}.out")
    h1 = g.node("Squeeze", [f"{prefix}.Y_h", g.axis0], f"{prefix}.h_out")
    c1 = g.node("Squeeze", [f"{prefix}.Y_c", g.axis0], f"{prefix}.c_out")
    return out, g.node("Concat", [h1, c1], f"{prefix}.state_out", axis=1)


def _dense_nodes(g, layer, prefix, cur, h):
    """``MatMul`` + ``Add`` + the activation on every step; no state (``h`` is None)."""
    Wt = g.const(f"{prefix}.W", layer.W.T)  # MatMul: data @ W.T
    b = g.const(f"{prefix}.b", layer.b)
    cur = g.node("Add", [g.node("MatMul", [cur, Wt], f"{prefix}.matmul"), b], f"{prefix}.affine")
    return _dense_activation(layer.activation, cur, prefix, g.node, g.const), None


def _gru_attributes(layer):
    """The ``GRU`` node's attributes: every activation parameter written out (see the module)."""
    attrs = {"hidden_size": layer.hidden_size, "linear_before_reset": layer.linear_before_reset,
             **_activation_attributes((layer.f, layer.g), ["Sigmoid", "Tanh"])}
    if layer.clip is not None:
        attrs["clip"] = float(layer.clip)
    return attrs


def _activation_attributes(specs, defaults):
    """An RNN node's ``activations`` (left out when they are the operator's ``defaults``),
    ``activation_alpha`` and ``activation_beta``, in the order onnxruntime reads them."""
    attrs = {}
    names, alphas, betas = [], [], []
    for name, alpha, beta in specs:
        onnx_name, uses_alpha, uses_beta, _, _ = ONNX_RNN_ACTIVATIONS[name]
        if name == "identity":  # not an RNN activation in ONNX: Affine(1, 0) is the same function
            alpha, beta = 1.0, 0.0
        names.append(onnx_name)
        if uses_alpha:
            alphas.append(alpha)
        if uses_beta:
            betas.append(beta)
    if names != defaults:
        attrs["activations"] = names
    if alphas:
        attrs["activation_alpha"] = alphas
    if betas:
        attrs["activation_beta"] = betas
    return attrs


def _dense_activation(spec, cur, prefix, node, const):
    """Append the nodes of a Dense layer's activation after ``cur``; returns the output name."""
    name, alpha, beta = spec
    out = f"{prefix}.out"
    if name == "identity":
        return node("Identity", [cur], out)
    if name == "softmax":
        return node("Softmax", [cur], out, axis=-1)
    if name == "affine":  # no Affine operator outside the RNN ops since opset 10
        scaled = node("Mul", [cur, const(f"{prefix}.alpha", np.float32(alpha))], f"{prefix}.scaled")
        return node("Add", [scaled, const(f"{prefix}.beta", np.float32(beta))], out)
    if name == "scaledtanh":  # alpha * tanh(beta * x)
        inner = node("Mul", [cur, const(f"{prefix}.beta", np.float32(beta))], f"{prefix}.inner")
        t = node("Tanh", [inner], f"{prefix}.tanh")
        return node("Mul", [t, const(f"{prefix}.alpha", np.float32(alpha))], out)
    op, params = _DENSE_OPS[name]
    values = {"alpha": alpha, "beta": beta}
    return node(op, [cur], out, **{p: float(values[p]) for p in params})


#: layer kind -> f(graph, layer, prefix, data, state columns or None) -> (data out, new state
#: or None): appends the nodes of one layer.
_LAYER_NODES = {"gru": _gru_nodes, "dense": _dense_nodes, "lstm": _lstm_nodes}
