"""Keras model files (``.keras`` and legacy full-model ``.h5``) -> :class:`streamgru.GRUModel`
(the :class:`~streamgru.model.Model` of GRU, LSTM and Dense layers).

Read with h5py and json only: no TensorFlow or Keras is imported, and nothing in the file is ever
executed (a ``Lambda`` layer's byte code or a custom object's module is refused, never loaded).

What maps
---------
A ``Sequential`` model, or a functional ``Model`` that is a plain chain (one data input, one
output, every layer called once on the previous layer's output), made of:

* ``GRU`` -> :class:`~streamgru.model.GRULayer`. Keras stores ``kernel`` (I, 3H) and
  ``recurrent_kernel`` (H, 3H) with gates in the order (z, r, h), which is ours: transpose, no
  reordering. ``reset_after=True`` is ``linear_before_reset=1`` with ``bias`` (2, 3H) =
  [input bias; recurrent bias]; ``reset_after=False`` is ``linear_before_reset=0`` with ``bias``
  (3H,) as ``Wb`` and ``Rb = 0``. ``activation`` and ``recurrent_activation`` become ``g`` and
  ``f``; ``use_bias=False`` gives zero biases.
* ``LSTM`` -> :class:`~streamgru.model.LSTMLayer`. Keras stores ``kernel`` (I, 4H) and
  ``recurrent_kernel`` (H, 4H) with gate blocks (i, f, c, o) along the columns and one ``bias``
  (4H,): transposed and reordered to our (i, o, f, c) rows, the bias as ``Wb`` and ``Rb = 0``
  (``converters._util.keras_lstm_tensors``). ``recurrent_activation`` is ``f``, ``activation``
  both ``g`` (cell candidate) and ``h`` (cell output); no peepholes, clip or projection.
  ``use_bias=False`` gives zero biases; ``unit_forget_bias`` only initialises the bias (the file's
  bias is read as it is). A stream's state for the layer is h then C (``2 * units`` values).
* ``Dense`` and ``TimeDistributed(Dense)`` -> :class:`~streamgru.model.DenseLayer` (``kernel``
  (in, out) is transposed to our (out, in)).
* ``Activation`` -> folded into the preceding Dense when that one is linear, otherwise an identity
  Dense layer carrying the activation (exact: ``W = I``, ``b = 0``).
* ``InputLayer`` and ``Dropout`` -> nothing (Dropout is the identity at inference).

Keras activations: linear, tanh, sigmoid, relu, softmax (Dense only), elu (alpha 1), softplus,
softsign, leaky_relu (negative slope 0.2) and hard_sigmoid, whose meaning depends on the Keras
version that wrote the file (see below). Anything else is refused.

``hard_sigmoid``: Keras 3 defines it as ``relu6(x + 3) / 6``, i.e. ``clip(x / 6 + 0.5, 0, 1)``
(alpha = 1/6, beta = 0.5; keras-team/keras PR #19477, tensorflow/tensorflow issue #65381), while
Keras 2 and tf.keras up to 2.15 used ``clip(0.2 x + 0.5, 0, 1)`` (alpha = 0.2). The writer's
version is read from ``metadata.json`` (``.keras``) or the ``keras_version`` attribute (``.h5``);
a file whose version cannot be read is refused only if it uses hard_sigmoid.

GRU and LSTM attributes
-----------------------
* ``go_backwards=True``: refused (a stream is read forwards).
* ``stateful=True`` (a fixed batch in ``batch_input_shape``/``batch_shape``, states held in the
  layer): accepted; the engine is always stateful, every stream keeps its state between calls
  until it is reset, for any number of streams. No state is read from the file.
* The streaming export ``y, h = GRU(H, return_sequences=True, return_state=True)(x,
  initial_state=h0)`` with inputs ``[x, h0]`` and outputs ``[y, h]`` (maybe a Dense on ``y``),
  or ``y, h, c = LSTM(...)(x, initial_state=[h0, c0])`` with inputs ``[x, h0, c0]`` (in any
  order) and outputs ``[y, h, c]``: a model input that only feeds a recurrent layer's
  ``initial_state`` is (part of) that layer's per-stream state, kept by the engine
  (``engine.open(key, state=...)``: the recurrent layers' states concatenated in layer order, an
  LSTM's as its ``initial_state[0]`` (h) then ``initial_state[1]`` (C), whatever the order of
  the model's inputs); outputs that only return a layer's state (``return_state=True``) are
  ignored, the engine keeps the state. Both are listed in ``GRUModel.notes`` (shown by
  ``streamgru info``), with where each layer's state sits in a stream's state.
* ``return_sequences=False``: accepted. Keras then returns one output per sequence, computed from
  the last step; the engine's output at step t is exactly what Keras returns for the sequence
  ``x[0..t]``, so a per-sequence model streams as the same model evaluated on every prefix.
* ``dropout``, ``recurrent_dropout``: accepted (inference ignores them). ``unroll``,
  ``implementation``, ``use_cudnn``, ``time_major``, ``zero_output_for_mask`` do not change the
  arithmetic of a step: accepted. Initializers, regularizers and constraints (and an LSTM's
  ``unit_forget_bias``): training only.
* Any configuration key not listed here is refused, so a future Keras option is never silently
  dropped.

Refused with :class:`~streamgru.errors.UnsupportedModelError` naming the layer: ``Bidirectional``
(of a GRU or an LSTM), ``Masking`` (masked steps would have to skip the state update), ``Lambda``
and every custom or unknown layer (other recurrent classes: ``SimpleRNN``, ``ConvLSTM1D``, ``RNN``
of a cell...), nested models, branching graphs, layers called with extra arguments, an
``initial_state`` that is not a model input of its own or does not hold one tensor per state (one
for a GRU, h and C for an LSTM), a layer consuming a returned state, quantized or LoRA Dense
layers, unmappable activations.
"""

from __future__ import annotations

import io
import json
import lzma
import math
import os
import re
import zipfile
import zlib

import numpy as np

from streamgru.errors import FormatError, UnsupportedModelError
from streamgru.formats import check_size, content_errors, read_file
from streamgru.model import DenseLayer, GRUModel

from ._util import check_keys, keras_dense_layer, keras_gru_layer, keras_lstm_layer, require, target_dtype

__all__ = ["from_keras"]

_COMMON_KEYS = frozenset({"name", "trainable", "dtype", "batch_input_shape", "batch_shape",
                          "input_shape", "batch_size"})
_TRAINING_KEYS = frozenset({
    "kernel_initializer", "recurrent_initializer", "bias_initializer", "kernel_regularizer",
    "recurrent_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint",
    "recurrent_constraint", "bias_constraint",
})
_GRU_KEYS = _COMMON_KEYS | _TRAINING_KEYS | {
    "units", "activation", "recurrent_activation", "use_bias", "reset_after", "return_sequences",
    "return_state", "go_backwards", "stateful", "unroll", "zero_output_for_mask", "time_major",
    "implementation", "dropout", "recurrent_dropout", "seed", "use_cudnn",
}
# The LSTM's keys are the GRU's without reset_after, with unit_forget_bias (which only sets the
# forget gate's initial bias to 1: the trained bias is in the file).
_LSTM_KEYS = (_GRU_KEYS - {"reset_after"}) | {"unit_forget_bias"}
# The recurrent classes -> what each of their state tensors is: initial_state[k] and the
# return_state output k + 1 (a stream's state holds them in this order).
_STATE_PARTS = {"GRU": ("state",), "LSTM": ("state h", "state C")}
_DENSE_KEYS = _COMMON_KEYS | _TRAINING_KEYS | {
    "units", "activation", "use_bias", "quantization_config", "lora_rank", "lora_alpha",
}
_TIME_DISTRIBUTED_KEYS = _COMMON_KEYS | {"layer"}
_ACTIVATION_KEYS = _COMMON_KEYS | {"activation"}
_DROPOUT_KEYS = _COMMON_KEYS | {"rate", "noise_shape", "seed"}
_MODEL_CLASSES = ("Sequential", "Functional", "Model")
# Keyword arguments a functional-graph call may carry without changing a step.
_CALL_KWARGS = frozenset({"training", "mask"})
# What zipfile, its decompressors and h5py raise on a damaged archive or HDF5 image. The file is
# read into memory first, so an OSError here is h5py reporting corrupt data, not the OS refusing
# the file; NotImplementedError is an unknown compression method, RuntimeError an encrypted
# member or an HDF5 library error, OverflowError h5py's file-object driver asked for an address
# beyond any file.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError,
                   RuntimeError, OSError, OverflowError)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def from_keras(path, *, dtype=None) -> GRUModel:
    """Read a Keras GRU/LSTM model file into a :class:`~streamgru.GRUModel`.

    Parameters
    ----------
    path : str or os.PathLike
        A Keras 3 ``.keras`` archive (config.json + model.weights.h5) or a legacy full-model HDF5
        file (``model.save("x.h5")`` in Keras 2, tf.keras or Keras 3: a ``model_config``
        attribute and a ``model_weights`` group). Weights-only files carry no architecture and
        are refused.
    dtype : {None, "float32", "float64"}, optional
        Dtype of the converted weights; None keeps the dtype stored in the file (float32 for a
        default Keras model; float16 weights are widened to float32).

    Returns
    -------
    GRUModel
        ``source`` is ``"keras <version>"``.

    Raises
    ------
    UnsupportedModelError
        A layer, attribute, activation or graph shape streamgru does not run (see the module
        docstring); the message names the layer and the reason.
    FormatError
        (a ValueError) The file is not a Keras model file, is damaged, or is inconsistent
        (weights of the wrong shape); or it is larger, or claims more, than
        ``streamgru.formats.MAX_READ_BYTES``. The message names the file.
    OSError
        The operating system refuses the file (FileNotFoundError, PermissionError).

    Examples
    --------
    >>> model = from_keras("tests/fixtures/keras_seq_reset_after.keras")  # doctest: +SKIP
    >>> [type(layer).__name__ for layer in model.layers]  # doctest: +SKIP
    ['DenseLayer', 'GRULayer', 'GRULayer', 'DenseLayer']
    """
    h5py = require("h5py", "keras")
    out_dtype = target_dtype(dtype)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: expected an existing Keras model file, got {path!r}")

    data = read_file(path)
    with content_errors(path):
        try:
            return _read_model(h5py, io.BytesIO(data), path, out_dtype)
        except _ARCHIVE_ERRORS as exc:
            raise FormatError(f"{path}: expected a readable Keras model file, got "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def _read_model(h5py, buf, path, out_dtype):
    """Convert the Keras file whose bytes are ``buf`` (a BytesIO)."""
    if zipfile.is_zipfile(buf):
        with zipfile.ZipFile(buf) as z:
            names = set(z.namelist())
            for needed in ("config.json", "model.weights.h5"):
                if needed not in names:
                    raise ValueError(
                        f"path: expected a .keras archive holding {needed}, got an archive with "
                        f"{sorted(names)}"
                    )
            # Decompressed sizes are checked against the limit before decompressing (zipfile
            # never returns more than a member's recorded size): a zip bomb is refused here.
            members = ["config.json", "model.weights.h5"] + (["metadata.json"]
                                                             if "metadata.json" in names else [])
            check_size(path, f"archive members {members} once decompressed",
                       sum(z.getinfo(m).file_size for m in members))
            config = json.loads(z.read("config.json"))
            version = None
            if "metadata.json" in names:
                version = json.loads(z.read("metadata.json")).get("keras_version")
            weights_bytes = z.read("model.weights.h5")
        with h5py.File(io.BytesIO(weights_bytes), "r") as f:
            store = _ZipWeights(f, path)
            return _convert(config, store, version, out_dtype)

    head = buf.getbuffer()
    # HDF5's signature is at offset 0 or after a user block of 512, 1024, 2048... bytes.
    offsets = [0] + [512 << k for k in range(max(0, len(head).bit_length() - 9))]
    if not any(bytes(head[o:o + 8]) == _HDF5_SIGNATURE for o in offsets):
        raise ValueError(
            f"path: expected a .keras archive or a legacy Keras .h5 file, got {path!r} "
            f"(neither a zip archive nor HDF5)"
        )
    del head  # a live export would stop h5py from reading the BytesIO
    with h5py.File(buf, "r") as f:
        if "model_config" not in f.attrs or "model_weights" not in f:
            raise ValueError(
                f"path: expected a Keras full-model .h5 file (a model_config attribute and a "
                f"model_weights group), got an HDF5 file with attributes {sorted(f.attrs)} and "
                f"groups {sorted(f.keys())}; a weights-only file has no architecture: save the "
                f"model with model.save(...)"
            )
        config = json.loads(_text(f.attrs["model_config"]))
        version = f.attrs.get("keras_version", f["model_weights"].attrs.get("keras_version"))
        version = _text(version) if version is not None else None
        store = _LegacyWeights(f["model_weights"], path)
        return _convert(config, store, version, out_dtype)


def _dataset(node, path, what):
    """The array of an HDF5 dataset, its size checked against the limit before it is read (a
    small file can declare a huge dataset with no data written)."""
    shape = getattr(node, "shape", None)
    dtype = getattr(node, "dtype", None)
    if shape is None or dtype is None or dtype.kind not in "fiub":
        raise ValueError(f"{what}: expected a numeric HDF5 dataset, got {node!r}")
    check_size(path, f"dataset {node.name} of shape {shape}", math.prod(shape) * dtype.itemsize)
    return np.asarray(node[()])


# --- reading weights -----------------------------------------------------------------------------

class _LegacyWeights:
    """Weights of a legacy .h5 file: ``model_weights/<layer name>`` with a ``weight_names`` list.

    Keras 2 names end in ``:0`` (``gru/gru_cell/kernel:0``), Keras 3 does not
    (``sequential/gru/gru_cell/kernel``); both end in the variable's own name.
    """

    def __init__(self, group, path):
        self.group = group
        self.path = path

    def get(self, entry, names):
        """The arrays of one layer as ``{short name: array}``, checked against ``names``."""
        lname = entry["name"]
        where = _where(entry)
        if lname not in self.group:
            raise ValueError(f"{where}: expected weights under model_weights/{lname}, got none")
        g = self.group[lname]
        found = {}
        for wn in g.attrs.get("weight_names", []):
            wn = _text(wn)
            short = re.sub(r":\d+$", "", wn.rsplit("/", 1)[-1])
            if short in found:
                raise ValueError(f"{where}: expected one weight named {short!r}, got two")
            found[short] = _dataset(g[wn], self.path, where)
        if set(found) != set(names):
            raise ValueError(
                f"{where}: expected weights {sorted(names)}, got {sorted(found)}"
            )
        return found


class _ZipWeights:
    """Weights of a .keras archive's model.weights.h5.

    Keras 3 stores a model's layers under ``layers/<key>`` where the key is the layer's class name
    in snake case, suffixed ``_1``, ``_2``... for repeats, in the order of ``model.layers`` (which
    includes InputLayer for a functional model but not for a Sequential one); a GRU's variables
    are under ``cell/vars``, a TimeDistributed's under ``layer/vars``, a Dense's under ``vars``,
    numbered in creation order (kernel, recurrent_kernel, bias; an LSTM's alike). Recent
    versions also write the
    layer's own name as the ``name`` attribute of ``<key>/vars``: when present it is used, and
    checked.
    """

    def __init__(self, f, path):
        self.f = f
        self.path = path
        self.by_name = {}
        if "layers" in f:
            for key, g in f["layers"].items():
                if "vars" in g and "name" in g["vars"].attrs:
                    self.by_name[_text(g["vars"].attrs["name"])] = key
        self.keys = {}

    def assign_keys(self, entries):
        """Compute each layer's storage key from the ``model.layers`` order."""
        used = {}
        for entry in entries:
            base = _snake_case(entry["class_name"])
            if base in used:
                used[base] += 1
                key = f"{base}_{used[base]}"
            else:
                used[base] = 0
                key = base
            self.keys[id(entry)] = key

    def get(self, entry, names):
        where = _where(entry)
        key = self.by_name.get(entry["name"], self.keys.get(id(entry)))
        sub = {"GRU": "cell/vars", "LSTM": "cell/vars",
               "TimeDistributed": "layer/vars"}.get(entry["class_name"], "vars")
        path = f"layers/{key}/{sub}"
        if key is None or path not in self.f:
            raise ValueError(
                f"{where}: expected its weights at {path} in model.weights.h5, got none"
            )
        g = self.f[path]
        arrays = [_dataset(g[k], self.path, where) for k in sorted(g.keys(), key=int)]
        if len(arrays) != len(names):
            raise ValueError(
                f"{where}: expected {len(names)} weight arrays ({', '.join(names)}), "
                f"got {len(arrays)}"
            )
        return dict(zip(names, arrays, strict=True))


# --- the model graph -----------------------------------------------------------------------------

def _convert(config, store, version, out_dtype):
    major = _major(version)
    entries, storage_order, notes = _chain(config)
    if isinstance(store, _ZipWeights):
        store.assign_keys(storage_order)
    layers = []
    for entry in entries:
        _convert_layer(entry, store, major, version, layers, out_dtype)
    if not any(layer.recurrent for layer in layers):
        raise UnsupportedModelError("model: expected at least one GRU or LSTM layer, got none")
    return GRUModel(layers, source=f"keras {version}" if version else "keras",
                    notes=notes + _state_notes(entries, layers))


def _chain(config):
    """The layers of a Sequential or plain-chain functional model, in order of application.

    Returns (chain, storage_order, notes): storage_order is ``model.layers`` as Keras saves
    them; notes say which model inputs were taken as per-stream states and which outputs were
    left to the engine. A streaming export (``y, h = GRU(..., return_state=True)(x,
    initial_state=h0)`` with inputs ``[x, h0]`` and outputs ``[y, h]``, or an LSTM's with
    ``initial_state=[h0, c0]`` and outputs ``[y, h, c]``) is a chain: an input that only feeds a
    recurrent layer's ``initial_state`` is (part of) that layer's per-stream state, which the
    engine keeps, and outputs that only return a layer's state are the engine's business.
    """
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"model_config: expected a Keras model config, got {str(config)[:80]!r}")
    cls = config["class_name"]
    cfg = config.get("config")
    _refuse_custom(config, "model")
    if cls == "Sequential":
        entries = cfg if isinstance(cfg, list) else cfg.get("layers", [])
        entries = [_entry(e) for e in entries]
        storage = [e for e in entries if e["class_name"] != "InputLayer"]
        notes = []
        for k, e in enumerate(entries):
            if e["class_name"] not in _STATE_PARTS or not (e["config"] or {}).get("return_state"):
                continue
            if k != len(entries) - 1:
                raise UnsupportedModelError(
                    f"{_where(e)}: return_state=True passes [output, state] to the next layer of "
                    f"a Sequential; expected it on the last layer only")
            notes.append(f"{_where(e)}: returns its state too (return_state=True): ignored, the "
                         f"engine keeps each stream's state")
        return entries, storage, notes
    if cls not in ("Functional", "Model"):
        raise UnsupportedModelError(
            f"model: expected a Sequential or functional Model, got class {cls!r}; a subclassed "
            f"model is Python code, which streamgru does not run"
        )
    entries = [_entry(e) for e in cfg.get("layers", [])]
    by_name = {e["name"]: e for e in entries}
    ins = _refs(cfg.get("input_layers"), "input_layers")
    outs = _refs(cfg.get("output_layers"), "output_layers")
    # source layer -> calls; state input -> (the layer it starts, its index in initial_state)
    consumers, state_of = {}, {}
    for e in entries:
        nodes = e["raw"].get("inbound_nodes") or []
        if e["class_name"] == "InputLayer":
            continue
        if len(nodes) != 1:
            raise UnsupportedModelError(
                f"{_where(e)}: expected to be called once, got {len(nodes)} calls (shared layers "
                f"are not a chain)"
            )
        src, states = _node_source(nodes[0], e)
        consumers.setdefault(src[0], []).append((e, src[1]))
        for k, st in enumerate(states):
            if st in state_of or st not in [i[0] for i in ins] or by_name.get(st, {}).get(
                    "class_name") != "InputLayer":
                raise UnsupportedModelError(
                    f"{_where(e)}: expected initial_state to be a model input of its own (the "
                    f"per-stream state), got {st!r}"
                    + (f", which also starts layer {state_of[st][0]['name']!r}"
                       if st in state_of else "")
                )
            state_of[st] = (e, k)
    # Outputs that only return a layer's state (return_state=True: tensors 1.. of its call).
    main = [o for o in outs if not _is_state_output(o, by_name)]
    data_ins = [i for i in ins if i[0] not in state_of]
    if len(data_ins) != 1 or len(main) != 1 or main[0][1] != 0:
        raise UnsupportedModelError(
            f"model: expected one data input and one output (plus state inputs feeding a GRU's "
            f"or LSTM's initial_state and state outputs of return_state=True), got inputs "
            f"{[i[0] for i in ins]} and outputs {[o[0] for o in outs]}; state inputs "
            f"{sorted(state_of)}"
        )
    for st, (layer, _) in state_of.items():
        if st in consumers:
            raise UnsupportedModelError(
                f"model input {st!r}: expected it to feed only the initial_state of layer "
                f"{layer['name']!r}, got it also consumed by "
                f"{[c[0]['name'] for c in consumers[st]]}"
            )
    start, end = data_ins[0][0], main[0][0]
    chain = [by_name[start]] if start in by_name else []
    cur = start
    while cur in consumers:
        nxt = consumers[cur]
        if len(nxt) != 1:
            names = [n[0]["name"] for n in nxt]
            raise UnsupportedModelError(
                f"layer {cur!r}: expected one consumer (a plain chain), got {names}"
            )
        e, tensor = nxt[0]
        if tensor != 0:
            raise UnsupportedModelError(
                f"{_where(e)}: expected to consume the sequence output of layer {cur!r}, got its "
                f"output {tensor} (a returned state); a plain chain passes the sequence on"
            )
        chain.append(e)
        cur = e["name"]
    missing = [e["name"] for e in entries if e not in chain and e["name"] not in state_of]
    if cur != end or missing:
        raise UnsupportedModelError(
            f"model: expected a plain chain from {start!r} to {end!r}, got a graph ending "
            f"at {cur!r} with layers off the chain: {missing}"
        )
    notes = [f"model input {st!r} is the initial {_STATE_PARTS[layer['class_name']][k]} of "
             f"{_where(layer)}: taken as the per-stream state, which the engine keeps (give it "
             f"with engine.open(key, state=...))" for st, (layer, k) in state_of.items()]
    notes += [f"model output {o[0]!r} (output {o[1]}) returns the "
              f"{_STATE_PARTS[by_name[o[0]]['class_name']][o[1] - 1]} of {_where(by_name[o[0]])}: "
              f"ignored, the engine keeps each stream's state"
              for o in outs if o not in main]
    return chain, entries, notes


def _is_state_output(ref, by_name):
    e = by_name.get(ref[0])
    return (e is not None and e["class_name"] in _STATE_PARTS
            and 1 <= ref[1] <= len(_STATE_PARTS[e["class_name"]])
            and bool((e["config"] or {}).get("return_state")))


def _state_notes(entries, layers):
    """Notes on stateful layers and on where each recurrent layer's state sits in a stream's
    state (an LSTM's always, since it holds two parts)."""
    notes = []
    recurrent = [e for e in entries if e["class_name"] in _STATE_PARTS]
    recurrent_layers = [layer for layer in layers if layer.recurrent]
    sizes = [layer.state_size for layer in recurrent_layers]
    ends = np.cumsum(sizes)
    for e, layer, start, stop in zip(recurrent, recurrent_layers, ends - sizes, ends, strict=True):
        cfg = e["config"] or {}
        if cfg.get("stateful"):
            shape = cfg.get("batch_input_shape") or cfg.get("batch_shape") or next(
                ((x["config"] or {}).get("batch_input_shape") or (x["config"] or {}).get(
                    "batch_shape") for x in entries if x["class_name"] == "InputLayer"), None)
            batch = shape[0] if isinstance(shape, list) and shape else None
            notes.append(
                f"{_where(e)} is stateful=True (batch {batch} in the file): the engine keeps its "
                f"state per stream, for any number of streams; the batch size is not a limit and "
                f"no stored state is read")
        if e["class_name"] == "LSTM":
            mid = start + layer.output_size
            notes.append(f"{_where(e)}: its state is elements {start}:{stop} of a stream's "
                         f"state: h {start}:{mid}, then C {mid}:{stop}")
        elif len(recurrent) > 1:
            notes.append(f"{_where(e)}: its state is elements {start}:{stop} of a stream's "
                         f"state")
    return notes


def _entry(raw):
    if not isinstance(raw, dict) or "class_name" not in raw:
        raise ValueError(f"model_config: expected a layer config, got {str(raw)[:80]!r}")
    cfg = raw.get("config") or {}
    name = raw.get("name") or (cfg.get("name") if isinstance(cfg, dict) else None)
    return {"class_name": raw["class_name"], "config": cfg, "name": name, "raw": raw}


def _refs(value, what):
    """``["x", 0, 0]`` or ``[["x", 0, 0], ...]`` -> list of (layer name, tensor index)."""
    def ref(v):
        return v[0], v[2] if len(v) > 2 and isinstance(v[2], int) else 0

    if isinstance(value, list) and value and isinstance(value[0], str):
        return [ref(value)]
    if isinstance(value, list) and all(isinstance(v, list) and v and isinstance(v[0], str)
                                       for v in value):
        return [ref(v) for v in value]
    raise UnsupportedModelError(f"model: expected {what} as a list of tensors, got {value!r}")


def _node_source(node, entry):
    """What feeds this call, refusing anything but ``layer(x)``, ``gru(x, initial_state=h)`` and
    ``lstm(x, initial_state=[h, c])``.

    Returns ((layer name, tensor index) of the data input, [names of the layers giving the
    initial states, in initial_state order]).
    """
    where = _where(entry)
    n_states = len(_STATE_PARTS.get(entry["class_name"], ()))
    states = []
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        args, kwargs = node.get("args", []), dict(node.get("kwargs", {}) or {})
        tensors = [a for a in args if _is_keras_tensor(a)]
        if len(args) != 1 or len(tensors) != 1:
            raise UnsupportedModelError(
                f"{where}: expected to be called on one tensor, got arguments {str(args)[:120]}"
            )
        history = tensors[0].get("config", {}).get("keras_history")
        src = (history[0] if history else None,
               history[2] if history and len(history) > 2 else 0)
        init = kwargs.pop("initial_state", None) if n_states else None
        for t in init if isinstance(init, list) else ([init] if init is not None else []):
            h = t.get("config", {}).get("keras_history") if _is_keras_tensor(t) else None
            if not h:
                raise UnsupportedModelError(
                    f"{where}: expected initial_state to be a model input tensor, got "
                    f"{str(t)[:120]}")
            states.append(h[0])
    elif isinstance(node, list):  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
        # tf.keras 2 records gru(x, initial_state=h) as a call on [x, h], and lstm(x,
        # initial_state=[h, c]) on [x, h, c].
        # A wrong number of states is refused below, as for Keras 3.
        n_in = len(node)
        if not (n_in == 1 or (n_states and n_in > 1)) or not all(
                isinstance(x, list) and len(x) >= 3 for x in node):
            raise UnsupportedModelError(
                f"{where}: expected to be called on one tensor, got {str(node)[:120]}"
            )
        src = (node[0][0], node[0][2])
        kwargs = node[0][3] if len(node[0]) > 3 and isinstance(node[0][3], dict) else {}
        states = [x[0] for x in node[1:]]
    else:
        raise UnsupportedModelError(f"{where}: expected an inbound node, got {str(node)[:120]}")
    if states and len(states) != n_states:
        raise UnsupportedModelError(
            f"{where}: expected initial_state to hold {n_states} tensor(s) "
            f"({', '.join(_STATE_PARTS[entry['class_name']])}), got {len(states)}: {states}"
        )
    extra = {k: v for k, v in kwargs.items() if k not in _CALL_KWARGS or (k == "mask" and v)}
    if extra:
        raise UnsupportedModelError(
            f"{where}: expected a plain call layer(x), got extra call arguments {sorted(extra)}"
        )
    if not isinstance(src[0], str):
        raise UnsupportedModelError(f"{where}: expected an input tensor from a layer, got "
                                    f"{src[0]!r}")
    return src, states


def _is_keras_tensor(a):
    return isinstance(a, dict) and a.get("class_name") == "__keras_tensor__"


# --- layers --------------------------------------------------------------------------------------

def _convert_layer(entry, store, major, version, layers, out_dtype):
    cls, cfg = entry["class_name"], entry["config"]
    where = _where(entry)
    _refuse_custom(entry["raw"], where)
    if cls == "InputLayer":
        return
    if cls == "GRU":
        layers.append(_gru(entry, store, major, version, out_dtype))
    elif cls == "LSTM":
        layers.append(_lstm(entry, store, major, version, out_dtype))
    elif cls == "Dense":
        layers.append(_dense(entry, cfg, store, major, version, out_dtype))
    elif cls == "TimeDistributed":
        check_keys(cfg, _TIME_DISTRIBUTED_KEYS, where)
        inner = cfg.get("layer")
        if not isinstance(inner, dict) or inner.get("class_name") != "Dense":
            got = inner.get("class_name") if isinstance(inner, dict) else inner
            raise UnsupportedModelError(
                f"{where}: expected TimeDistributed(Dense), got TimeDistributed({got})"
            )
        _refuse_custom(inner, where)
        layers.append(_dense(entry, inner.get("config") or {}, store, major, version, out_dtype))
    elif cls == "Activation":
        check_keys(cfg, _ACTIVATION_KEYS, where)
        if not layers:
            raise UnsupportedModelError(
                f"{where}: expected an Activation after a GRU, LSTM or Dense layer, got it first"
            )
        act = _activation(cfg.get("activation"), major, version, where, "activation", dense=True)
        append_activation(layers, act, out_dtype)
    elif cls in ("Dropout",):
        check_keys(cfg, _DROPOUT_KEYS, where)
    elif cls == "Bidirectional":
        raise UnsupportedModelError(
            f"{where}: Bidirectional needs the whole sequence (its backward half reads it from "
            f"the end); a stream is stepped forwards only"
        )
    elif cls == "Masking":
        raise UnsupportedModelError(
            f"{where}: Masking makes a GRU or LSTM skip masked steps (state carried unchanged); "
            f"streamgru updates the state on every step"
        )
    elif cls == "Lambda":
        raise UnsupportedModelError(
            f"{where}: a Lambda layer is Python code stored in the file; streamgru reads JSON "
            f"only and never executes model code"
        )
    elif cls in _MODEL_CLASSES:
        raise UnsupportedModelError(
            f"{where}: a nested model; expected a flat stack of GRU/LSTM/Dense layers (rebuild the "
            f"model without nesting)"
        )
    else:
        raise UnsupportedModelError(
            f"{where}: unsupported layer class {cls!r}; expected GRU, LSTM, Dense, "
            f"TimeDistributed(Dense), Activation, Dropout or InputLayer"
        )


def _refuse_backwards(cfg, where):
    if cfg.get("go_backwards", False):
        raise UnsupportedModelError(
            f"{where}: go_backwards=True reads the sequence from its end; a stream is stepped "
            f"forwards only"
        )


def _units(cfg, where):
    H = cfg.get("units")
    if isinstance(H, bool) or not isinstance(H, int) or H < 1:
        raise ValueError(f"{where}: expected units to be a positive int, got {H!r}")
    return H


def _recurrent(entry, store, major, version, gates):
    """What GRU and LSTM layers share: ``(H, f, g, kernel, recurrent, bias)`` with
    ``recurrent_activation`` as f, ``activation`` as g, the kernels' shapes checked for
    ``gates`` gate blocks (GRU 3, LSTM 4) and ``bias`` None without ``use_bias``."""
    cfg, where = entry["config"], _where(entry)
    H = _units(cfg, where)
    g = _activation(cfg.get("activation", "tanh"), major, version, where, "activation")
    f = _activation(cfg.get("recurrent_activation", "sigmoid"), major, version, where,
                    "recurrent_activation")
    use_bias = bool(cfg.get("use_bias", True))
    w = store.get(entry, ["kernel", "recurrent_kernel"] + (["bias"] if use_bias else []))
    kernel, recurrent = w["kernel"], w["recurrent_kernel"]
    if kernel.ndim != 2 or kernel.shape[1] != gates * H:
        raise ValueError(
            f"{where}: expected kernel of shape (input_size, {gates * H}), got {kernel.shape}"
        )
    if recurrent.shape != (H, gates * H):
        raise ValueError(f"{where}: expected recurrent_kernel of shape {(H, gates * H)}, got "
                         f"{recurrent.shape}")
    return H, f, g, kernel, recurrent, w.get("bias")


def _gru(entry, store, major, version, out_dtype):
    cfg, where = entry["config"], _where(entry)
    check_keys(cfg, _GRU_KEYS, where)
    _refuse_backwards(cfg, where)
    if "reset_after" not in cfg:
        raise UnsupportedModelError(
            f"{where}: reset_after is not stated in the config (its default changed between "
            f"Keras versions); streamgru never guesses linear_before_reset"
        )
    reset_after = bool(cfg["reset_after"])
    H, f, g, kernel, recurrent, bias = _recurrent(entry, store, major, version, 3)
    Wb = Rb = None
    if bias is not None:
        if reset_after:
            # reset_after=True: bias (2, 3H) = [input bias; recurrent bias], the recurrent one
            # inside r * (R h + Rb): ONNX linear_before_reset=1.
            if bias.shape != (2, 3 * H):
                raise ValueError(
                    f"{where}: expected bias of shape {(2, 3 * H)} (reset_after=True), got "
                    f"{bias.shape}"
                )
            Wb, Rb = bias[0], bias[1]
        else:
            # reset_after=False: one bias (3H,) added to the input projection; Rb = 0.
            if bias.shape != (3 * H,):
                raise ValueError(
                    f"{where}: expected bias of shape {(3 * H,)} (reset_after=False), got "
                    f"{bias.shape}"
                )
            Wb = bias
            Rb = np.zeros_like(bias)
    return keras_gru_layer(kernel, recurrent, Wb, Rb, linear_before_reset=1 if reset_after else 0,
                           f=f, g=g, out_dtype=out_dtype)


def _lstm(entry, store, major, version, out_dtype):
    cfg, where = entry["config"], _where(entry)
    check_keys(cfg, _LSTM_KEYS, where)
    _refuse_backwards(cfg, where)
    H, f, g, kernel, recurrent, bias = _recurrent(entry, store, major, version, 4)
    if bias is not None and bias.shape != (4 * H,):
        raise ValueError(f"{where}: expected bias of shape {(4 * H,)}, got {bias.shape}")
    # Keras's gate blocks (i, f, c, o) -> ours (i, o, f, c); activation is both g and h.
    return keras_lstm_layer(kernel, recurrent, bias, f=f, g=g, out_dtype=out_dtype)


def _dense(entry, cfg, store, major, version, out_dtype):
    where = _where(entry)
    check_keys(cfg, _DENSE_KEYS, where)
    if cfg.get("quantization_config") is not None:
        raise UnsupportedModelError(
            f"{where}: a quantized Dense layer (quantization_config set); expected float weights"
        )
    if cfg.get("lora_rank"):
        raise UnsupportedModelError(
            f"{where}: a LoRA Dense layer (lora_rank={cfg['lora_rank']}); merge the LoRA weights "
            f"into the kernel before saving"
        )
    use_bias = bool(cfg.get("use_bias", True))
    units = cfg.get("units")
    act = _activation(cfg.get("activation", "linear"), major, version, where, "activation",
                      dense=True)
    w = store.get(entry, ["kernel"] + (["bias"] if use_bias else []))
    kernel = w["kernel"]
    if kernel.ndim != 2 or (units is not None and kernel.shape[1] != units):
        raise ValueError(f"{where}: expected kernel of shape (in, {units}), got {kernel.shape}")
    b = w.get("bias")
    if b is not None and b.shape != (kernel.shape[1],):
        raise ValueError(f"{where}: expected bias of shape {(kernel.shape[1],)}, got {b.shape}")
    return keras_dense_layer(kernel, b, act, out_dtype)


def append_activation(layers, act, out_dtype=None):
    """Append a standalone activation to a layer list (shared with the RTNeural converter).

    Folded into the last layer when it is a linear Dense; otherwise an identity Dense layer
    (``W = I``, ``b = 0``: exact in floating point) carries it.
    """
    last = layers[-1]
    if isinstance(last, DenseLayer) and last.activation[0] == "identity":
        layers[-1] = DenseLayer(last.in_features, last.out_features, last.W, last.b, act)
        return
    n = last.output_size
    dt = out_dtype or np.result_type(*last.tensors().values())
    layers.append(DenseLayer(n, n, np.eye(n, dtype=dt), np.zeros(n, dt), act))


# --- activations ---------------------------------------------------------------------------------

_KERAS_ACTIVATIONS = {
    "linear": ("identity",),
    "tanh": ("tanh",),
    "sigmoid": ("sigmoid",),
    "relu": ("relu",),
    "softmax": ("softmax",),
    "elu": ("elu", 1.0),
    "softplus": ("softplus",),
    "softsign": ("softsign",),
    "leaky_relu": ("leakyrelu", 0.2),
}


def _activation(spec, major, version, where, key, dense=False):
    """A Keras activation name -> a streamgru ``(name, alpha, beta)`` spec, or refuse."""
    name = "linear" if spec is None else spec  # Keras reads activation=None as linear
    if isinstance(spec, dict):
        # Keras 3 may serialise a built-in as {"module": "keras.activations", "class_name":
        # "function", "config": "tanh"}; anything else is a custom object.
        if spec.get("module") == "keras.activations" and isinstance(spec.get("config"), str):
            name = spec["config"]
        else:
            raise UnsupportedModelError(
                f"{where}: {key} is a custom object {str(spec)[:120]}; streamgru maps built-in "
                f"activations only and never loads code"
            )
    if not isinstance(name, str):
        raise UnsupportedModelError(f"{where}: {key} expected an activation name, got {spec!r}")
    if name == "hard_sigmoid":
        if major is None:
            raise UnsupportedModelError(
                f"{where}: {key}='hard_sigmoid' means clip(0.2x+0.5) in Keras 2 and "
                f"clip(x/6+0.5) in Keras 3, and the file does not say which Keras wrote it "
                f"(keras_version {version!r})"
            )
        return ("hardsigmoid", 1.0 / 6.0, 0.5) if major >= 3 else ("hardsigmoid", 0.2, 0.5)
    if name not in _KERAS_ACTIVATIONS or (name == "softmax" and not dense):
        raise UnsupportedModelError(
            f"{where}: {key}={name!r} has no streamgru equivalent here; supported: "
            f"{sorted(set(_KERAS_ACTIVATIONS) - ({'softmax'} if not dense else set()))} and "
            f"hard_sigmoid"
        )
    return _KERAS_ACTIVATIONS[name]


# --- small helpers -------------------------------------------------------------------------------

def _refuse_custom(raw, where):
    """Keras 3 configs name a built-in's module ("keras.layers"); custom classes name their own."""
    module = raw.get("module")
    registered = raw.get("registered_name")
    if (module is not None and module != "keras" and not str(module).startswith("keras.")) or (
        registered not in (None, raw.get("class_name"))
    ):
        raise UnsupportedModelError(
            f"{where}: a custom class (module {module!r}, registered_name {registered!r}); "
            f"streamgru reads built-in Keras layers only and never loads custom code"
        )


def _where(entry):
    return f"layer {entry['name']!r} ({entry['class_name']})"


def _snake_case(name):
    # keras.src.utils.naming.to_snake_case, which names a layer's group in model.weights.h5.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _major(version):
    m = re.match(r"\s*(\d+)\.", version) if isinstance(version, str) else None
    return int(m.group(1)) if m else None


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)



