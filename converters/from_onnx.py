"""Import an ONNX graph whose computation is a chain of ``GRU`` and ``LSTM`` nodes, with Dense
layers around them.

What is mapped
--------------
The converter walks the one data path from the graph's input to its output. Reading the graph,
evaluating constants and tracking shapes through value-preserving plumbing is the generic
:class:`converters._onnx_graph.GraphWalker`; this module is the layer mapper on top of it. On
that path:

* ``GRU`` (forward, ``layout`` 0 or 1, any ``linear_before_reset``, ``activations`` f, g with
  ``activation_alpha``/``activation_beta``, ``clip``) becomes a :class:`streamgru.GRULayer`.
  ONNX and streamgru share one layout (gates z, r, h; ``B = [Wb; Rb]``), so tensors are copied
  without reordering: ``W[0]``, ``R[0]``, ``B[0][:3H]``, ``B[0][3H:]``.
* ``LSTM`` (forward, ``layout`` 0 or 1, ``activations`` f, g, h with their alpha/beta, ``clip``,
  ``input_forget``, peepholes ``P``) becomes a :class:`streamgru.LSTMLayer`. Its canonical
  layout is ONNX's too (gates i, o, f, c; ``P`` = [P_i; P_o; P_f]; see
  :mod:`streamgru.layers.lstm`): ``W[0]``, ``R[0]``, ``B[0][:4H]``, ``B[0][4H:]``, ``P[0]``
  are copied as they stand. A stream's state for the layer is h then C: ``initial_h`` then
  ``initial_c``.
* ``MatMul`` with a constant right operand, ``Gemm`` (``transA=0``, any ``transB``/``alpha``/
  ``beta``), ``Add``/``Sub``/``Mul``/``Div`` by a constant that broadcasts along the features, and
  the activations ``Relu Tanh Sigmoid LeakyRelu Elu HardSigmoid Softsign Softplus ThresholdedRelu
  Softmax(last axis)`` become :class:`streamgru.DenseLayer` (an activation or bias with no
  matrix before it becomes a Dense layer with an identity matrix).
* Value-preserving plumbing is passed over after checking that it keeps the feature axis last and
  intact and never mixes time with batch: ``Identity``, ``Dropout`` (inference), ``Cast`` to a
  float type, ``Transpose``, ``Squeeze``, ``Unsqueeze``, ``Reshape`` (constant target or one
  computed from ``Shape`` chains), ``Flatten`` of the last axis, no-op ``Slice``.
* Selecting the last time step after the recurrent chain (``y[:, -1]`` as ``Gather``/``Slice``, or
  using ``Y_h``) is accepted: streamgru emits the output of every step, and the graph's output is
  the one at the final step.

Weights may be initializers, ``Constant`` nodes, or any constant subgraph (the dynamo exporter can
rebuild ``W``/``R`` from PyTorch-order tensors with Slice/Concat/Unsqueeze): such subgraphs are
evaluated with ``onnx.reference.ReferenceEvaluator``.

What is refused (:class:`streamgru.UnsupportedModelError`, naming the node and the reason)
-----------------------------------------------------------------------------------------
* ``direction`` reverse or bidirectional (a stream cannot see its future), ``sequence_lens``,
  a non-zero constant ``initial_h`` or ``initial_c`` (every stream starts from zeros, or from the
  state given to ``engine.open``), any attribute this module does not implement.
* An LSTM's ``Y_c`` (its cell state) on the data path: the layer's output is h.
* Any op on the data path that changes values and is not listed above; extra graph outputs that
  are not recurrent states (``Y_h``, ``Y_c``); several recurrent nodes that do not form one chain
  (pass ``node=``).

Initial state policy: an ``initial_h`` (``initial_c``) absent or all zeros is accepted. One that
comes from a graph input (``torch.onnx.export(gru, (x, h0))``, ``(x, (h0, c0))`` for an LSTM) is
the per-stream state: streamgru keeps it in the engine, so streams start from zeros unless given a
state (``engine.open(key, state=...)``), the recurrent layers' states concatenated in layer order
(a GRU's h; an LSTM's h then C). What the graph does with its state outputs (``Y_h``, ``Y_c``
returned as graph outputs) is left to the engine, which keeps each stream's state; the model's
``notes`` say which inputs and outputs were taken that way.

Activation parameters follow onnxruntime (checked against it in the tests): the
``activation_alpha`` list is consumed in order by the activations that take an alpha, likewise
``activation_beta``; a missing value takes onnxruntime's default, which is the ONNX operator's
default for LeakyRelu (0.01), HardSigmoid (0.2, 0.5) and Elu (1.0) but **0** for Affine,
ScaledTanh and ThresholdedRelu. Values no activation consumes are refused.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from streamgru.errors import UnsupportedModelError
from streamgru.formats import content_errors
from streamgru.model import DenseLayer, GRULayer, GRUModel, LSTMLayer

from ._onnx_graph import PLUMBING as _PLUMBING
from ._onnx_graph import Desc as _Desc
from ._onnx_graph import GraphWalker, load_external, read_onnx
from ._onnx_graph import has_external as _has_external
from ._onnx_graph import node_name as _name
from ._util import ONNX_RNN_ACTIVATIONS, cast_layer, require

# read_onnx, load_external and io_signature are the hooks converters.verify runs a graph with.
__all__ = ["from_onnx", "read_onnx", "load_external", "io_signature"]


class _RecurrentOp(NamedTuple):
    """What differs between the ONNX recurrent ops this module maps. Both number their inputs
    X, W, R, B, sequence_lens, initial_h (5), and the LSTM adds initial_c (6) and P (7)."""

    gates: int            # gate blocks stacked in W and R (B holds 2 * gates of them)
    attrs: frozenset      # the attributes this module implements; any other is refused
    activations: tuple    # the activation positions, in the order of ``activations``
    defaults: tuple       # the ONNX defaults of those positions
    states: tuple         # (input index, input name) of the layer's state parts, in state order
    state_outputs: tuple  # output indices that re-expose the state (Y_h, and Y_c)
    switch: str           # its 0/1 attribute: GRU linear_before_reset, LSTM input_forget
    peepholes: bool       # takes P (input 7)
    layer: type           # the streamgru layer class it becomes
    inputs: int           # how many inputs the op defines


_RNN_ATTRS = frozenset({"activation_alpha", "activation_beta", "activations", "clip",
                        "direction", "hidden_size", "layout"})
_RECURRENT = {
    "GRU": _RecurrentOp(3, _RNN_ATTRS | {"linear_before_reset"}, ("f", "g"),
                        ("sigmoid", "tanh"), ((5, "initial_h"),), (1,), "linear_before_reset",
                        False, GRULayer, 6),
    "LSTM": _RecurrentOp(4, _RNN_ATTRS | {"input_forget"}, ("f", "g", "h"),
                         ("sigmoid", "tanh", "tanh"), ((5, "initial_h"), (6, "initial_c")),
                         (1, 2), "input_forget", True, LSTMLayer, 8),
}
_RECURRENT_NAMES = " or ".join(_RECURRENT)  # "GRU or LSTM", for messages

# ONNX RNN activation (lower-case) -> (uses alpha, uses beta, onnxruntime's defaults).
_ORT_ACT = {k: v[1:] for k, v in ONNX_RNN_ACTIVATIONS.items() if k != "identity"}

# Dense-path activation ops: name -> (canonical name, {attribute: default}).
_DENSE_ACTS = {
    "Relu": ("relu", {}),
    "Tanh": ("tanh", {}),
    "Sigmoid": ("sigmoid", {}),
    "Softsign": ("softsign", {}),
    "Softplus": ("softplus", {}),
    "LeakyRelu": ("leakyrelu", {"alpha": 0.01}),
    "Elu": ("elu", {"alpha": 1.0}),
    "ThresholdedRelu": ("thresholdedrelu", {"alpha": 1.0}),
    "HardSigmoid": ("hardsigmoid", {"alpha": 0.2, "beta": 0.5}),
}
_AFFINE = {"MatMul", "Gemm", "Add", "Sub", "Mul", "Div"}
# Ops allowed in a chain that only re-exposes recurrent states as an extra graph output.
_STATE_OPS = {"Identity", "Concat", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Slice",
              "Gather", "Cast"}


def from_onnx(path_or_model, node=None, *, dtype=None) -> GRUModel:
    """Convert an ONNX model with a forward GRU/LSTM chain into a :class:`streamgru.Model`.

    Parameters
    ----------
    path_or_model : str, os.PathLike or onnx.ModelProto
        A ``.onnx`` file (external data is read only from files inside the model's directory)
        or a loaded model.
    node : str, optional
        Name of one ``GRU`` or ``LSTM`` node to import alone as a one-layer model. Needed when
        the graph holds several recurrent nodes that do not form one chain; the surrounding
        graph is not mapped: the node's ``X`` is the engine's input and its ``initial_h`` (and
        ``initial_c``), however the graph computes them, are the stream's state.
    dtype : {None, "float32", "float64"}, optional
        Cast every tensor to this dtype. None keeps the model's dtype (float16 becomes float32).

    Returns
    -------
    Model
        GRU and LSTM layers in chain order with Dense layers before, between and after them;
        ``source="onnx"``; ``notes`` say which graph inputs were taken as the per-stream state
        and which outputs were left to the engine.

    Raises
    ------
    UnsupportedModelError
        For a graph or attribute streamgru cannot run faithfully; the message names the node.
    FormatError
        (a ValueError) A file protobuf cannot parse, without a graph, with a tensor whose dims
        disagree with its data or exceed ``streamgru.formats.MAX_READ_BYTES``, or with NaN/inf
        in an initializer (named); the message names the file.

    Examples
    --------
    >>> import numpy as np, onnx
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> H, I = 2, 3
    >>> W = numpy_helper.from_array(np.zeros((1, 3 * H, I), np.float32), "W")
    >>> R = numpy_helper.from_array(np.zeros((1, 3 * H, H), np.float32), "R")
    >>> gru = helper.make_node("GRU", ["X", "W", "R"], ["Y", "Y_h"], hidden_size=H, name="gru")
    >>> graph = helper.make_graph(
    ...     [gru], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "N", I])],
    ...     [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [W, R])
    >>> model = from_onnx(helper.make_model(graph))
    >>> model.layers
    (GRULayer(input_size=3, hidden_size=2, linear_before_reset=0, f='sigmoid', g='tanh'),)

    An LSTM node with peepholes; its ``initial_h`` and ``initial_c`` graph inputs are the
    stream's state (h then C):

    >>> W = numpy_helper.from_array(np.zeros((1, 4 * H, I), np.float32), "W")
    >>> R = numpy_helper.from_array(np.zeros((1, 4 * H, H), np.float32), "R")
    >>> P = numpy_helper.from_array(np.zeros((1, 3 * H), np.float32), "P")
    >>> lstm = helper.make_node("LSTM", ["X", "W", "R", "", "", "h0", "c0", "P"],
    ...                         ["Y", "Y_h", "Y_c"], hidden_size=H, name="lstm")
    >>> graph = helper.make_graph(
    ...     [lstm], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
    ...                   (("X", ["T", "N", I]), ("h0", [1, "N", H]), ("c0", [1, "N", H]))],
    ...     [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [W, R, P])
    >>> model = from_onnx(helper.make_model(graph))
    >>> model.layers, model.state_size
    ((LSTMLayer(input_size=3, hidden_size=2, peepholes=True, f='sigmoid', g='tanh', h='tanh'),), 4)
    >>> print(model.notes[0])
    node 'lstm': its initial_h and initial_c come from graph input(s) ['c0', 'h0']: taken as the
    per-stream state (initial_h = elements 0:2, initial_c = elements 2:4 of a stream's state),
    kept in the engine (give it with engine.open(key, state=...))
    """
    onnx = require("onnx", "onnx")
    if dtype is not None:
        if str(np.dtype(dtype)) not in ("float32", "float64"):
            raise ValueError(f"dtype: expected None, 'float32' or 'float64', got {dtype!r}")
        dtype = np.dtype(dtype)
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
        if _has_external(model):
            load_external(model, None)  # raises: no directory to read from
    elif isinstance(path_or_model, (str, os.PathLike)):
        path = os.fspath(path_or_model)
        if not os.path.exists(path):
            raise FileNotFoundError(f"path_or_model: expected an existing .onnx file, got {path!r}")
        model = read_onnx(path, "path_or_model")
        base = os.path.dirname(os.path.abspath(path))
        load_external(model, base)
    else:
        raise TypeError(
            f"path_or_model: expected a path or an onnx.ModelProto, "
            f"got {type(path_or_model).__name__}"
        )
    if node is not None and not isinstance(node, str):
        raise TypeError(f"node: expected the name (str) of a {_RECURRENT_NAMES} node, or None, "
                        f"got {node!r}")
    if isinstance(path_or_model, onnx.ModelProto):
        g = _Graph(model, "path_or_model")
        layers = g.convert(node)
    else:
        # A graph that parses but does not hang together (a node missing inputs, a tensor of
        # an unknown type) makes the walker index and convert what is not there.
        with content_errors(path):
            g = _Graph(model, path)
            layers = g.convert(node)
    if dtype is not None:
        layers = [cast_layer(layer, dtype) for layer in layers]
    return GRUModel(layers, source="onnx", notes=g.notes)

class _Dense:
    """A Dense layer being assembled: y = act(W x + b), W (out, in)."""

    def __init__(self, W, b, act=None):
        self.W, self.b, self.act = W, b, act

    def layer(self):
        out, inp = self.W.shape
        return DenseLayer(inp, out, self.W, self.b, self.act or "identity")

class _Graph(GraphWalker):
    """The layer mapper: recurrent nodes (:data:`_RECURRENT`) and Dense-like ops on the walker's
    data path, as layers."""

    # ---------------------------------------------------------------- zeros / state analysis
    def initial_state_kind(self, name, rnn, which):
        """'zero', 'input' (comes from a graph input: the per-stream state) or raise.

        ``name``: the tensor feeding input ``which`` (``initial_h``, ``initial_c``) of the
        recurrent node ``rnn``."""
        what = f"node {_name(rnn)!r} ({rnn.op_type}) input {which}"
        if self.is_const(name):
            v = self.const(name, what)
            if np.any(v != 0):
                raise UnsupportedModelError(
                    f"{what}: expected no {which} or all zeros, got a non-zero constant "
                    f"(max |{which}| = {float(np.max(np.abs(v))):g}); streamgru keeps one state "
                    f"per stream and starts it from zeros: drop the constant from the export and "
                    f"give each stream its start state with engine.open(key, state=...)"
                )
            return "zero"
        if name in self.input_names:
            return "input"
        n = self.producer.get(name)
        op = n.op_type
        kinds = None
        if op == "ConstantOfShape":
            a = self.attrs(n, {"value"})
            v = self.tensor_array(a["value"]) if "value" in a else np.zeros(1)
            if np.any(v != 0):
                raise UnsupportedModelError(f"{what}: expected zeros, got ConstantOfShape "
                                            f"{_name(n)!r} with value {v.tolist()}")
            kinds = {"zero"}
            self._mark_ancestors(n.input[0])
        elif op == "Expand":
            kinds = {self.initial_state_kind(n.input[0], rnn, which)}
            self._mark_ancestors(n.input[1])
        elif op in ("Identity", "Cast", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Transpose",
                    "Gather", "Concat"):
            first = n.input[:1] if op != "Concat" else n.input
            kinds = {self.initial_state_kind(i, rnn, which) for i in first if i}
            for i in n.input[len(first):]:
                if i:
                    self._mark_ancestors(i)
        else:
            raise UnsupportedModelError(
                f"{what}: computed by {op} node {_name(n)!r}; expected zeros or a graph input "
                f"(the per-stream state) passed through plumbing ops"
            )
        self.used.add(id(n))
        return "input" if "input" in kinds else "zero"

    # ---------------------------------------------------------------- recurrent nodes
    def rnn_layer(self, n, initial_state="chain", offset=0):
        """The node (``GRU`` or ``LSTM``) as a GRULayer or LSTMLayer, and its layout.

        ``initial_state``: "chain" checks that each initial state input is zeros or comes from
        a graph input; "alone": the node was named by the user (``node=``), so a computed
        initial state is the stream's state whatever computes it; "skip": not looked at
        (attribute checks only). ``offset``: where the layer's state starts in a stream's state
        (for the notes).
        """
        op = _RECURRENT[n.op_type]
        a = self.attrs(n, op.attrs)
        where = f"node {_name(n)!r} ({n.op_type})"
        direction = a.get("direction", "forward")
        if direction != "forward":
            raise UnsupportedModelError(
                f"{where}: direction={direction!r} is not supported: a stream is advanced one "
                f"step at a time and cannot see its future; export a forward (unidirectional) "
                f"{n.op_type}"
            )
        layout = a.get("layout", 0)
        if layout not in (0, 1):
            raise UnsupportedModelError(f"{where}: layout: expected 0 or 1, got {layout}")
        if len(n.input) > op.inputs:
            raise UnsupportedModelError(f"{where}: expected at most {op.inputs} inputs, got "
                                        f"{len(n.input)}: {list(n.input)}")
        ins = list(n.input) + [""] * (op.inputs - len(n.input))
        G = op.gates
        W = self.const(ins[1], f"{where} input W")
        R = self.const(ins[2], f"{where} input R")
        if W.ndim != 3 or W.shape[0] != 1 or W.shape[1] % G:
            raise UnsupportedModelError(f"{where}: W: expected shape (1, {G}*hidden_size, "
                                        f"input_size), got {W.shape}")
        H = W.shape[1] // G
        I = W.shape[2]
        if "hidden_size" in a and a["hidden_size"] != H:
            raise UnsupportedModelError(f"{where}: hidden_size: expected {H} (from W), "
                                        f"got {a['hidden_size']}")
        if R.shape != (1, G * H, H):
            raise UnsupportedModelError(f"{where}: R: expected shape {(1, G * H, H)}, "
                                        f"got {R.shape}")
        tensors = {"W": W[0], "R": R[0]}
        if ins[3]:
            B = self.const(ins[3], f"{where} input B")
            if B.shape != (1, 2 * G * H):
                raise UnsupportedModelError(f"{where}: B: expected shape {(1, 2 * G * H)}, "
                                            f"got {B.shape}")
            tensors["Wb"], tensors["Rb"] = B[0, :G * H], B[0, G * H:]
        if op.peepholes and ins[7]:
            P = self.const(ins[7], f"{where} input P")
            if P.shape != (1, 3 * H):
                raise UnsupportedModelError(f"{where}: P: expected shape {(1, 3 * H)} "
                                            f"(peepholes i, o, f), got {P.shape}")
            tensors["P"] = P[0]
        if ins[4]:
            seq = self.const(ins[4], f"{where} input sequence_lens") \
                if self.is_const(ins[4]) else None
            if seq is None or seq.size:
                raise UnsupportedModelError(
                    f"{where}: sequence_lens is not supported: streamgru advances each stream "
                    f"one step per call, so a stream's length is the number of steps you feed "
                    f"it; export without sequence_lens"
                )
        if initial_state != "skip":
            self._initial_states(n, [(which, ins[i], f"{offset + k * H}:{offset + (k + 1) * H}")
                                     for k, (i, which) in enumerate(op.states) if ins[i]],
                                 initial_state)
        for name, t in tensors.items():
            if t.dtype.kind != "f":
                raise UnsupportedModelError(f"{where}: {name}: expected float weights, got "
                                            f"{t.dtype}")
        settings = dict(zip(op.activations, self._activations(a, where, n.op_type),
                            strict=True))
        settings[op.switch] = a.get(op.switch, 0)
        if settings[op.switch] not in (0, 1):
            raise UnsupportedModelError(f"{where}: {op.switch}: expected 0 or 1, got "
                                        f"{settings[op.switch]}")
        # ONNX's tensors are the canonical layouts of both kinds (gates z, r, h; i, o, f, c;
        # peepholes i, o, f): nothing is reordered.
        try:
            layer = op.layer(I, H, **tensors, clip=a.get("clip"), **settings)
        except (TypeError, ValueError) as exc:
            raise UnsupportedModelError(f"{where}: {exc}") from None
        return layer, layout

    def _initial_states(self, n, parts, mode):
        """Check (mode "chain") and note what feeds the initial state inputs of node ``n``:
        ``parts`` [(input name: initial_h or initial_c, tensor, elements of a stream's state)]."""
        taken, sources = [], set()
        for which, name, cols in parts:
            if mode == "alone" and not self.is_const(name):
                # A streaming export computes each node's initial state from its caches (Slice,
                # Gather, ScatterND on one cache tensor): the named node's is the stream's state.
                src = self.producer.get(name)
                how = f"computed by {src.op_type} node {_name(src)!r}" if src is not None else \
                    "a graph input"
                taken.append((f"{which} {name!r} ({how})", which, cols))
            elif self.initial_state_kind(name, n, which) == "input":
                taken.append((which, which, cols))
                sources.update(self.source_inputs(name))
        if not taken:
            return
        what = " and ".join(t[0] for t in taken)
        where = ", ".join(f"{which} = elements {cols}" for _, which, cols in taken)
        if mode == "alone":
            self.note(f"node {_name(n)!r}: its {what} {'is' if len(taken) == 1 else 'are'} taken "
                      f"as the per-stream state ({where} of a stream's state), kept in the engine")
        else:
            self.note(f"node {_name(n)!r}: its {what} {'comes' if len(taken) == 1 else 'come'} "
                      f"from graph input(s) {sorted(sources)}: taken as the per-stream state "
                      f"({where} of a stream's state), kept in the engine (give it with "
                      f"engine.open(key, state=...))")

    def _activations(self, a, where, op_type):
        """The node's activations, one ``(name, alpha, beta)`` per position of its op."""
        op = _RECURRENT[op_type]
        acts = a.get("activations")
        alphas = list(a.get("activation_alpha", []))
        betas = list(a.get("activation_beta", []))
        if acts is None:
            if alphas or betas:
                raise UnsupportedModelError(
                    f"{where}: activation_alpha/activation_beta given without activations; "
                    f"the defaults ({', '.join(op.defaults)}) take no parameters")
            return op.defaults
        acts = [x.decode() if isinstance(x, bytes) else x for x in acts]
        if len(acts) != len(op.activations):
            raise UnsupportedModelError(
                f"{where}: activations: expected {len(op.activations)} names "
                f"({', '.join(op.activations)}) for a forward {op_type}, got {acts}")
        out, ia, ib = [], 0, 0
        for name in acts:
            key = name.lower()
            if key not in _ORT_ACT:
                raise UnsupportedModelError(
                    f"{where}: activations: {name!r} is not an ONNX RNN activation; expected one "
                    f"of {sorted(_ORT_ACT)}")
            ua, ub, alpha, beta = _ORT_ACT[key]
            # onnxruntime consumes the lists in order, one value per activation that takes it.
            if ua and ia < len(alphas):
                alpha = alphas[ia]
                ia += 1
            if ub and ib < len(betas):
                beta = betas[ib]
                ib += 1
            out.append((key, alpha if ua else None, beta if ub else None))
        if ia < len(alphas) or ib < len(betas):
            raise UnsupportedModelError(
                f"{where}: activation_alpha={alphas} / activation_beta={betas} have values that "
                f"no activation in {acts} consumes (onnxruntime reads them in order, one per "
                f"activation that takes that parameter); refusing rather than ignoring them")
        return tuple(out)

    # ---------------------------------------------------------------- data path
    def data_input(self, n):
        """The one non-constant input of a node on the data path."""
        op = n.op_type
        if op in _PLUMBING or op in _DENSE_ACTS or op in _RECURRENT or op in ("Softmax", "Gemm"):
            return n.input[0]
        if op in ("MatMul", "Add", "Sub", "Mul", "Div"):
            non = [i for i in n.input if not self.is_const(i)]
            if len(non) != 1:
                raise UnsupportedModelError(
                    f"node {_name(n)!r} ({op}): combines two computed tensors "
                    f"({list(n.input)}); only a constant operand can be mapped to a Dense layer")
            return non[0]
        raise UnsupportedModelError(
            f"node {_name(n)!r} ({op}): this op changes values and has no streamgru equivalent; "
            f"only GRU, LSTM, MatMul/Gemm/Add/Sub/Mul/Div by constants, activations and "
            f"value-preserving plumbing can be mapped")

    def state_output(self, out):
        """The nodes computing a graph output that only re-exposes recurrent states (a GRU's or
        LSTM's Y_h, an LSTM's Y_c) or state inputs, else None."""
        names = []
        stack = [out]
        while stack:
            v = stack.pop()
            if v in self.input_names or self.is_const(v):
                continue
            n = self.producer.get(v)
            if n is None:
                return None
            if n.op_type in _RECURRENT:
                outs = list(n.output) + ["", ""]
                if v not in [outs[i] for i in _RECURRENT[n.op_type].state_outputs]:
                    return None
                continue
            if n.op_type not in _STATE_OPS:
                return None
            names.append(n)
            stack.append(n.input[0])
            if n.op_type == "Concat":
                stack.extend(n.input[1:])
        return names

    def convert(self, node_name):
        rnns = [n for n in self.nodes if n.op_type in _RECURRENT]
        if node_name is not None:
            pick = [n for n in rnns if n.name == node_name]
            if not pick:
                raise UnsupportedModelError(
                    f"node: expected the name of a {_RECURRENT_NAMES} node, got {node_name!r}; "
                    f"recurrent nodes: {self.describe(rnns) or 'none'}")
            n = pick[0]
            layer, _ = self.rnn_layer(n, initial_state="alone")
            x = n.input[0]
            src = self.producer.get(x)
            how = f"computed by {src.op_type} node {_name(src)!r}" if src is not None else \
                "a graph input"
            self.note(f"node {_name(n)!r}: its input X {x!r} ({how}) is the engine's input; the "
                      f"rest of the graph is not mapped")
            return [layer]
        if not rnns:
            raise UnsupportedModelError(self.no_recurrent_message())
        for n in rnns:
            self.rnn_layer(n, initial_state="skip")  # attribute refusals (direction, ...) first
        try:
            layers, on_path = self.chain()
        except UnsupportedModelError as exc:
            if len(rnns) > 1:
                raise UnsupportedModelError(
                    f"graph has {len(rnns)} recurrent nodes that streamgru could not map as one "
                    f"chain ({exc}); recurrent nodes: {self.describe(rnns)}; pass "
                    f"node='<name>' to import one of them as a one-layer model") from None
            raise
        missing = [n for n in rnns if id(n) not in on_path]
        if missing:
            raise UnsupportedModelError(
                f"graph has {len(rnns)} recurrent nodes that do not form one chain from the "
                f"input to the output ({self.describe(missing)} off the chain); recurrent "
                f"nodes: {self.describe(rnns)}; pass node='<name>' to import one of them as a "
                f"one-layer model")
        return layers

    def describe(self, rnns):
        parts = []
        for n in rnns:
            try:
                W = self.const(n.input[1], "W")
                shape = (f"input_size={W.shape[-1]}, "
                         f"hidden_size={W.shape[-2] // _RECURRENT[n.op_type].gates}")
            except UnsupportedModelError:
                shape = "W not constant"
            parts.append(f"{n.name or '<unnamed>'!r} ({n.op_type}, {shape})")
        return ", ".join(parts)

    def no_recurrent_message(self):
        ops = {}
        for n in self.nodes:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        found = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) or "no nodes"
        msg = f"graph has no {_RECURRENT_NAMES} node (found: {found})"
        if "RNN" in ops:
            msg += "; streamgru runs GRU and LSTM layers, not the simple RNN"
        elif "Loop" in ops or "Scan" in ops:
            msg += ("; the recurrence is a Loop/Scan, as tf2onnx emits for Keras 3 recurrent "
                    "layers: convert the Keras model file with converters.from_keras instead, or "
                    "export with a converter that emits the ONNX GRU or LSTM op")
        elif "Sigmoid" in ops and "Tanh" in ops and ("Gemm" in ops or "MatMul" in ops):
            msg += ("; this looks like an unrolled recurrent cell (torch nn.GRUCell and "
                    "nn.LSTMCell export as Gemm/Sigmoid/Tanh): use nn.GRU or nn.LSTM (copy the "
                    "cell's weight_ih/weight_hh/bias_* into a 1-layer module) before exporting, "
                    "or convert the torch module with converters.from_torch")
        else:
            msg += "; export a model that uses the ONNX GRU or LSTM op"
        return msg

    def chain(self):
        """Map the data path from the graph input to the main output into layers."""
        main = [o for o in self.outputs if self.state_output(o) is None]
        if not main and len(self.outputs) == 1:
            main = list(self.outputs)  # the graph returns only Y_h: the last step's output
        if len(main) != 1:
            raise UnsupportedModelError(
                f"graph outputs: expected exactly one output computed through the recurrent "
                f"chain (other outputs may only re-expose recurrent states: Y_h, Y_c), got "
                f"{main or 'none'} among {self.outputs}")
        start, path = self.path_to(main[0])
        self.main, self.start, self.chain_rnns = main[0], start, []
        shape = self.static_shape(start)
        if shape is None or len(shape) < 1:
            raise UnsupportedModelError(f"graph input {start!r}: expected a known rank")
        labels = [f"a{i}" for i in range(len(shape) - 1)]
        for lab, size in zip(labels, shape[:-1], strict=True):
            self.labels_size[lab] = size
        desc = _Desc(labels, shape[-1])
        self.value_desc[start] = desc
        layers, dense, on_path = [], None, set()
        self.time = None
        for n, out in path:
            self.used.add(id(n))
            on_path.add(id(n))
            op = n.op_type
            if op in _RECURRENT:
                if dense is not None:
                    layers.append(dense.layer())
                    dense = None
                desc = self.apply_rnn(n, out, desc, layers)
            elif op in _AFFINE or op in _DENSE_ACTS or op == "Softmax":
                desc, dense, closed = self.apply_dense(n, desc, dense)
                layers.extend(closed)
            else:
                desc = self.apply_plumbing(n, desc)
            self.value_desc[out] = desc
        if dense is not None:
            layers.append(dense.layer())
        for o in self.outputs:
            if o != main[0]:
                self.note(f"graph output {o!r} only re-exposes recurrent states (Y_h, Y_c): "
                          f"ignored, the engine keeps each stream's state")
                for n in self.state_output(o):
                    self.used.add(id(n))
                    for i in n.input[1:] if n.op_type != "Concat" else ():
                        self._mark_ancestors(i)
        needed = set()
        for o in self.outputs:
            needed |= {id(n) for n in self.ancestors(o)}
        stray = [n for n in self.nodes if id(n) in needed and id(n) not in self.used]
        if stray:
            raise UnsupportedModelError(
                "nodes " + ", ".join(f"{_name(n)!r} ({n.op_type})" for n in stray[:8])
                + " feed the graph outputs but are not part of the mapped chain; refusing "
                  "rather than skipping them")
        return layers, on_path

    # ---------------------------------------------------------------- per-op mapping
    def apply_rnn(self, n, out, desc, layers):
        offset = sum(layer.state_size for layer in layers)
        layer, layout = self.rnn_layer(n, offset=offset)
        where = f"node {_name(n)!r} ({n.op_type})"
        outs = list(n.output) + ["", ""]
        if n.op_type == "LSTM" and out == outs[2]:
            raise UnsupportedModelError(
                f"{where}: expected Y or Y_h on the data path to the graph output, got its "
                f"output Y_c {out!r} (the cell state); streamgru's LSTM layer outputs h and keeps "
                f"C in the stream's state")
        if desc.last_only:
            raise UnsupportedModelError(f"{where}: its input keeps only the last time step of "
                                        f"the previous layer")
        if len(desc.axes) != 2:
            raise UnsupportedModelError(f"{where}: X: expected rank 3, got rank {desc.rank}")
        t, b = (desc.axes[0], desc.axes[1]) if layout == 0 else (desc.axes[1], desc.axes[0])
        # A unit time axis is a graph that takes one step per call (state fed back by the user).
        # A graph exported with T = 1 loses the time axis's label through Reshapes to constant
        # shapes; any unit axis is then as good as another: they all hold one element.
        same = self.time is None or t == self.time or (self._unit(t) and self._unit(self.time))
        if not (isinstance(t, str) or t == 1) or not same:
            raise UnsupportedModelError(
                f"{where}: X: its time axis is not the time axis of the graph input")
        if self.time is None:
            self.time = t
        if desc.width is not None and desc.width != layer.input_size:
            raise UnsupportedModelError(f"{where}: X: expected {layer.input_size} features, "
                                        f"got {desc.width}")
        layers.append(layer)
        self.chain_rnns.append((n, layout, layer))
        H = layer.output_size
        if out == outs[0]:
            return _Desc((t, 1, b) if layout == 0 else (b, t, 1), H)
        return _Desc((1, b) if layout == 0 else (b, 1), H, last_only=True)

    def apply_dense(self, n, desc, dense):
        """Returns (desc, open dense or None, list of finished DenseLayers)."""
        op = n.op_type
        where = f"node {_name(n)!r} ({op})"
        closed = []
        width = desc.width

        def flush():
            nonlocal dense
            if dense is not None:
                closed.append(dense.layer())
                dense = None

        if op in ("MatMul", "Gemm"):
            if op == "MatMul":
                self.attrs(n, set())
                if not self.is_const(n.input[1]) or self.is_const(n.input[0]):
                    raise UnsupportedModelError(f"{where}: expected data @ constant matrix")
                K = self.const(n.input[1], where)
                if K.ndim != 2:
                    raise UnsupportedModelError(f"{where}: expected a 2-D weight, got shape "
                                                f"{K.shape}")
                Wt, b = K.T, np.zeros(K.shape[1], K.dtype)
            else:
                a = self.attrs(n, {"alpha", "beta", "transA", "transB"})
                if a.get("transA", 0):
                    raise UnsupportedModelError(f"{where}: transA=1 transposes the data")
                if desc.rank != 2:
                    raise UnsupportedModelError(f"{where}: expected a 2-D input, got rank "
                                                f"{desc.rank}")
                Bm = self.const(n.input[1], where)
                Wt = (Bm if a.get("transB", 0) else Bm.T) * Bm.dtype.type(a.get("alpha", 1.0))
                b = np.zeros(Wt.shape[0], Bm.dtype)
                if len(n.input) > 2 and n.input[2]:
                    C = self.const(n.input[2], where)
                    b = b + self._bias(C, Wt.shape[0], where) * C.dtype.type(a.get("beta", 1.0))
            if width is not None and Wt.shape[1] != width:
                raise UnsupportedModelError(f"{where}: expected a weight for {width} features, "
                                            f"got {Wt.shape[1]}")
            flush()
            dense = _Dense(np.ascontiguousarray(Wt), b)
            return desc.replace(width=Wt.shape[0]), dense, closed
        if op in ("Add", "Sub", "Mul", "Div"):
            self.attrs(n, set())
            ci = 1 if self.is_const(n.input[1]) else 0
            c = self.const(n.input[ci], where)
            if c.ndim > desc.rank:
                raise UnsupportedModelError(f"{where}: the constant adds axes")
            if width is None:
                raise UnsupportedModelError(f"{where}: the feature width is unknown")
            v = self._bias(c, width, where)
            if op in ("Sub", "Div") and ci == 0:
                raise UnsupportedModelError(f"{where}: constant {op.lower()} data is not mapped")
            if dense is None or dense.act is not None:
                flush()
                eye = np.eye(width, dtype=v.dtype)
                dense = _Dense(eye, np.zeros(width, v.dtype))
            if op == "Add":
                dense.b = dense.b + v
            elif op == "Sub":
                dense.b = dense.b - v
            else:
                s = v if op == "Mul" else 1 / v
                dense.W = dense.W * s[:, None]
                dense.b = dense.b * s
            return desc, dense, closed
        # activations
        if op == "Softmax":
            a = self.attrs(n, {"axis"})
            axis = a.get("axis", -1 if self.opset >= 13 else 1) % desc.rank
            if axis != desc.rank - 1:
                raise UnsupportedModelError(f"{where}: softmax over axis {axis}; only the "
                                            f"feature (last) axis is mappable")
            spec = "softmax"
        else:
            key, defaults = _DENSE_ACTS[op]
            a = self.attrs(n, set(defaults))
            vals = [float(a.get(k, d)) for k, d in defaults.items()]
            spec = (key, *vals) if vals else key
        if width is None:
            raise UnsupportedModelError(f"{where}: the feature width is unknown")
        if dense is None or dense.act is not None:
            flush()
            dense = _Dense(np.eye(width, dtype=np.float32), np.zeros(width, np.float32))
        dense.act = spec
        return desc, dense, closed

    @staticmethod
    def _bias(c, width, where):
        c = np.asarray(c)
        if c.dtype.kind != "f":
            raise UnsupportedModelError(f"{where}: expected a float constant, got {c.dtype}")
        squeezed = c.reshape(c.shape[-1:] if c.ndim else ()) if all(
            d == 1 for d in c.shape[:-1]) else None
        if squeezed is None or squeezed.size not in (1, width):
            raise UnsupportedModelError(
                f"{where}: the constant of shape {c.shape} does not broadcast along the "
                f"{width} features only")
        return np.broadcast_to(squeezed, (width,)).astype(c.dtype)


def io_signature(model):
    """How to run a convertible graph as a reference (for ``converters.verify``).

    Returns a dict: ``input`` (the data input's name), ``sizes`` (the sizes of its leading axes,
    None where the graph runs at any size), ``time_axis`` and ``batch_axis`` of that input,
    ``output`` (the main output's name), ``out_time_axis`` (None when the graph returns only the
    last step), ``out_batch_axis``, ``recurrent`` [(node, layout, layer)] in chain order,
    ``states`` [(tensor, layout, start, width)]: each initial state input of those nodes in
    state order (a GRU's ``initial_h``; an LSTM's ``initial_h`` then ``initial_c``; tensor ""
    when the node has none), shaped (1, batch, width) for layout 0 and (batch, 1, width) for 1,
    which is elements ``start:start + width`` of a stream's state; ``state_size``;
    ``other_inputs`` (names of the remaining graph inputs: per-stream states) and ``notes``
    (what the converter took as state or ignored).
    """
    g = _Graph(model, "source")
    g.convert(None)
    states, offset = [], 0
    for n, layout, layer in g.chain_rnns:
        ins = list(n.input) + [""] * 8
        parts = _RECURRENT[n.op_type].states
        width = layer.state_size // len(parts)  # h and C are equally wide: ONNX has no projection
        for k, (i, _) in enumerate(parts):
            states.append((ins[i], layout, offset + k * width, width))
        offset += layer.state_size
    in_axes = g.value_desc[g.start].axes
    if len(in_axes) != 2 or not isinstance(g.time, str):
        raise UnsupportedModelError(
            f"graph input {g.start!r}: expected (time, batch, features) in some order, got axes "
            f"{in_axes}; a graph that takes one step per call cannot be run as a sequence")
    batch = next(a for a in in_axes if a != g.time)
    out = g.value_desc[g.main]
    out_axes = list(out.axes)
    pos = {a: out_axes.index(a) for a in in_axes if a in out_axes}
    # An axis of size 1 at export (a graph exported for one stream, without dynamic axes) loses
    # its label through a Reshape to a constant shape: it is one of the output's unit axes, and
    # as every such axis has size 1, which one does not change the data.
    lost = [a for a in in_axes if a not in pos and g._unit(a)]
    ones = [i for i, a in enumerate(out_axes) if a == 1 and i not in pos.values()]
    pos.update(zip(lost, ones))
    if batch not in pos or (not out.last_only and g.time not in pos):
        raise UnsupportedModelError(f"graph output {g.main!r}: expected time and batch axes, got "
                                    f"{tuple(out_axes)}")
    return {
        "input": g.start,
        "sizes": [g.labels_size.get(a) for a in in_axes],
        "time_axis": in_axes.index(g.time),
        "batch_axis": in_axes.index(batch),
        "output": g.main,
        "out_time_axis": None if out.last_only else pos[g.time],
        "out_batch_axis": pos[batch],
        "recurrent": list(g.chain_rnns),
        "states": states,
        "state_size": offset,
        "other_inputs": [i.name for i in g.inputs if i.name != g.start],
        "notes": list(g.notes),
    }
