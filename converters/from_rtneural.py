"""RTNeural model JSON -> :class:`streamgru.GRUModel`.

The format is the one RTNeural's Python exporters write and its C++ loader
``RTNeural/model_loader.h`` (``json_parser::parseJson``) reads
(https://github.com/jatinchowdhury18/RTNeural; exporters ``python/model_utils.py`` for Keras and
``python/model_utils_torch.py`` for PyTorch)::

    {"in_shape": [null, null, I],
     "layers": [{"type": "gru" | "lstm" | "dense" | "time-distributed-dense" | "activation" | ...,
                 "activation": "" | "tanh" | "relu" | "sigmoid" | "softmax" | "elu",
                 "shape": [null, null, out_size],
                 "weights": [...]}, ...]}

The input size is ``in_shape[-1]`` and each layer's output size ``shape[-1]``, as in the loader.

Weight layouts (Keras layout, as ``layer.get_weights()`` returns it):

* ``gru``: ``[kernel (I, 3H), recurrent_kernel (H, 3H), bias]`` with gate blocks (z, r, h) along
  the columns: our (z, r, n) rows after a transpose, no reordering (``loadGRU`` and
  ``GRULayer::setWVals`` read column ``k`` as z, ``k + H`` as r, ``k + 2H`` as the candidate).
  RTNeural's GRU is Keras's ``reset_after=True`` (``setBVals`` keeps the candidate's recurrent
  bias inside ``r * (...)``), so a bias of shape (2, 3H) = [input bias; recurrent bias] is
  ``linear_before_reset=1``. A bias of shape (3H,) is what the Keras exporter writes for a
  ``reset_after=False`` GRU: RTNeural's loader cannot read it, but its meaning is unambiguous,
  so it maps to ``linear_before_reset=0`` with ``Wb = bias``, ``Rb = 0``. A GRU without a bias
  (two weight arrays) is refused: reset_after cannot be told without it.
  RTNeural always runs sigmoid gates and a tanh candidate, whatever the file says: ``f`` and
  ``g`` are sigmoid and tanh, and a GRU whose ``"activation"`` is anything but ``"tanh"`` (or
  absent) is refused, because the model it came from did not use tanh (the Keras exporter writes
  ``""`` for linear and every other unlisted activation). The recurrent activation is not in the
  format: a Keras GRU trained with hard_sigmoid gates exported this way runs with sigmoid gates in
  RTNeural and here alike.
* ``lstm``: ``[kernel (I, 4H), recurrent_kernel (H, 4H), bias (4H,)]``, Keras's layout, with
  gate blocks (i, f, c, o) along the columns (``LSTMLayer::setWVals``/``setUVals``/``setBVals``
  read column ``k`` as i, ``k + H`` as f, ``k + 2H`` as the candidate, ``k + 3H`` as o):
  transposed and reordered to our (i, o, f, c) rows (``converters._util.keras_lstm_tensors``),
  the one bias as ``Wb``, ``Rb = 0``. RTNeural's LSTM always runs sigmoid gates and tanh for
  both the candidate and the cell output (``f``, ``g``, ``h`` = sigmoid, tanh, tanh); as for the
  GRU, an ``"activation"`` other than ``"tanh"`` (or absent) is refused, and the recurrent
  activation is not in the format. A missing bias (Keras ``use_bias=False`` exported: two
  arrays) is zeros; RTNeural's own loader would reject such a file. A stream's state for the
  layer is h then C (``2H`` values).
* ``dense`` / ``time-distributed-dense``: ``[kernel (in, out), bias (out,)]``, transposed to our
  (out, in). A missing bias (Keras ``use_bias=False`` exported) is zeros; RTNeural's own loader
  would reject such a file. ``"activation"``: ``""`` is linear; tanh, relu, sigmoid, softmax,
  elu (alpha 1) are what RTNeural's ``createActivation`` knows; anything else is refused.
* ``activation``: a standalone activation, folded into the preceding linear Dense or carried by
  an identity Dense layer.

Refused by layer index and type: ``conv1d``, ``conv2d``, ``prelu``, ``batchnorm``,
``batchnorm2d`` and any other type (RTNeural silently skips unknown types; we do not).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from streamgru.errors import UnsupportedModelError
from streamgru.formats import content_errors, read_json
from streamgru.model import GRUModel

from ._util import check_keys, keras_dense_layer, keras_gru_layer, keras_lstm_layer, target_dtype
from .from_keras import append_activation

__all__ = ["from_rtneural", "is_rtneural_json"]

_ACTIVATIONS = {
    "": ("identity",),
    "tanh": ("tanh",),
    "relu": ("relu",),
    "sigmoid": ("sigmoid",),
    "softmax": ("softmax",),
    "elu": ("elu", 1.0),
}
_LAYER_KEYS = frozenset({"type", "activation", "shape", "weights", "name"})
_REFUSED = {
    "conv1d": "convolutions need a window of past inputs, not a recurrent state",
    "conv2d": "convolutions need a window of past inputs, not a recurrent state",
    "prelu": "PReLU has a learned per-channel slope streamgru has no layer for",
    "batchnorm": "batch normalisation has no streamgru layer (fold it into the next Dense first)",
    "batchnorm2d": "batch normalisation has no streamgru layer",
}


def is_rtneural_json(obj) -> bool:
    """Whether a parsed JSON object looks like an RTNeural model file.

    True for a dict with an ``"in_shape"`` list and a ``"layers"`` list whose entries are dicts
    holding ``"type"`` and ``"weights"``; a state-dict JSON (tensor names mapping to arrays) has
    neither. It does not validate the layers: :func:`from_rtneural` does.

    Examples
    --------
    >>> is_rtneural_json({"in_shape": [None, None, 1],
    ...                   "layers": [{"type": "gru", "shape": [None, None, 8], "weights": []}]})
    True
    >>> is_rtneural_json({"gru.weight_ih_l0": [[0.1]], "gru.weight_hh_l0": [[0.2]]})
    False
    """
    if not isinstance(obj, Mapping):
        return False
    shape, layers = obj.get("in_shape"), obj.get("layers")
    return (
        isinstance(shape, list)
        and isinstance(layers, list)
        and all(isinstance(layer, Mapping) and "type" in layer and "weights" in layer
                for layer in layers)
    )


def from_rtneural(path_or_dict, *, dtype=None) -> GRUModel:
    """Read an RTNeural model JSON into a :class:`~streamgru.GRUModel`.

    Parameters
    ----------
    path_or_dict : str, os.PathLike or dict
        A JSON file path, or the already parsed JSON object.
    dtype : {None, "float32", "float64"}, optional
        Dtype of the converted weights. None means float32: every RTNeural exporter writes
        float32 weights as decimals, which convert back to float32 exactly; ``"float64"`` keeps
        the decimals as parsed.

    Returns
    -------
    GRUModel
        ``source`` is ``"rtneural"``. Like RTNeural's GRU and LSTM, the engine is stateful: each
        stream's state persists across steps until it is reset.

    Raises
    ------
    UnsupportedModelError
        A layer type or activation streamgru does not run, named by layer index and type.
    ValueError
        Not an RTNeural JSON, or weights whose shapes disagree with the declared sizes; from a
        file, a FormatError (a ValueError) naming the file, as for invalid JSON or a file
        larger than ``streamgru.formats.MAX_READ_BYTES``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> I, H = 1, 4
    >>> doc = {"in_shape": [None, None, I], "layers": [
    ...     {"type": "gru", "activation": "tanh", "shape": [None, None, H],
    ...      "weights": [rng.normal(size=(I, 3 * H)).tolist(), rng.normal(size=(H, 3 * H)).tolist(),
    ...                  rng.normal(size=(2, 3 * H)).tolist()]},
    ...     {"type": "dense", "activation": "", "shape": [None, None, 1],
    ...      "weights": [rng.normal(size=(H, 1)).tolist(), [0.0]]}]}
    >>> model = from_rtneural(doc)
    >>> model.input_size, model.state_size, model.layers[0].linear_before_reset
    (1, 4, 1)
    """
    out_dtype = target_dtype(dtype) or np.dtype(np.float32)
    if isinstance(path_or_dict, Mapping):
        return _convert(path_or_dict, out_dtype)
    if isinstance(path_or_dict, (str, os.PathLike)):
        doc = read_json(path_or_dict, "path_or_dict")
        with content_errors(path_or_dict):
            return _convert(doc, out_dtype)
    raise TypeError(
        f"path_or_dict: expected a path or a dict, got {type(path_or_dict).__name__}"
    )


def _convert(doc, out_dtype):
    """The GRUModel of a parsed RTNeural document."""
    if not is_rtneural_json(doc):
        keys = sorted(doc)[:8] if isinstance(doc, Mapping) else type(doc).__name__
        raise ValueError(
            f"path_or_dict: expected an RTNeural model JSON (\"in_shape\" and \"layers\" with "
            f"\"type\"/\"weights\" per layer), got {keys}"
        )
    width = _size(doc["in_shape"], "in_shape")
    layers = []
    for i, spec in enumerate(doc["layers"]):
        kind = spec["type"]
        where = f"layers[{i}] ({kind!r})"
        if kind in _REFUSED:
            raise UnsupportedModelError(f"{where}: unsupported layer type: {_REFUSED[kind]}")
        if kind not in ("gru", "lstm", "dense", "time-distributed-dense", "activation"):
            raise UnsupportedModelError(
                f"{where}: unknown layer type; expected gru, lstm, dense, time-distributed-dense "
                f"or activation"
            )
        check_keys(spec, _LAYER_KEYS, where, what="keys")
        out = _size(spec.get("shape"), f"{where} shape")
        act_name = spec.get("activation")  # None: absent (RTNeural's loader allows that too)
        if act_name is not None and not isinstance(act_name, str):
            raise ValueError(f"{where}: expected activation to be a string, got {act_name!r}")
        weights = spec["weights"]
        if not isinstance(weights, list):
            raise ValueError(
                f"{where}: expected weights to be a list, got {type(weights).__name__}"
            )
        if kind == "gru":
            layers.append(_gru(weights, act_name, width, out, where, out_dtype))
        elif kind == "lstm":
            layers.append(_lstm(weights, act_name, width, out, where, out_dtype))
        elif kind == "activation":
            if not layers:
                raise UnsupportedModelError(f"{where}: expected an activation after a layer, got "
                                            f"it first")
            if out != width:
                raise ValueError(f"{where}: expected shape[-1] == {width}, got {out}")
            act = _activation(act_name, where)
            if act[0] != "identity":
                append_activation(layers, act, out_dtype)
        else:
            layers.append(_dense(weights, act_name, width, out, where, out_dtype))
        width = out
    if not any(layer.recurrent for layer in layers):
        raise UnsupportedModelError("layers: expected at least one gru or lstm layer, got none")
    return GRUModel(layers, source="rtneural")


def _tanh_only(act_name, where, what):
    """RTNeural's recurrent layers always run tanh where ``what`` says, whatever the field says:
    refuse a file whose exporter saw another activation there."""
    if act_name not in (None, "tanh"):
        raise UnsupportedModelError(
            f"{where}: activation {act_name!r}: RTNeural's {what} and ignores this field, while "
            f"the model it was exported from did not use tanh (the Keras exporter writes \"\" "
            f"for linear and other unlisted activations); set it to \"tanh\" if the original "
            f"model used tanh"
        )


def _gru(weights, act_name, I, H, where, out_dtype):
    _tanh_only(act_name, where, "GRU always uses tanh for the candidate")
    if len(weights) == 2:
        raise UnsupportedModelError(
            f"{where}: no bias array, so reset_after (linear_before_reset) cannot be told; "
            f"RTNeural itself needs a (2, 3H) bias: export zeros of that shape for reset_after=True"
        )
    if len(weights) != 3:
        raise ValueError(
            f"{where}: expected weights [kernel, recurrent_kernel, bias], got {len(weights)} arrays"
        )
    kernel = _array(weights[0], (I, 3 * H), f"{where} kernel (weights[0])")
    recurrent = _array(weights[1], (H, 3 * H), f"{where} recurrent kernel (weights[1])")
    bias = _array(weights[2], None, f"{where} bias (weights[2])")
    if bias.shape == (2, 3 * H):
        # RTNeural = Keras reset_after=True: [input bias; recurrent bias], linear_before_reset=1.
        Wb, Rb, lbr = bias[0], bias[1], 1
    elif bias.shape == (3 * H,):
        # Keras reset_after=False exported as is: one input-side bias, Rb = 0.
        Wb, Rb, lbr = bias, np.zeros_like(bias), 0
    else:
        raise ValueError(
            f"{where} bias (weights[2]): expected shape {(2, 3 * H)} or {(3 * H,)}, "
            f"got {bias.shape}"
        )
    return keras_gru_layer(kernel, recurrent, Wb, Rb, linear_before_reset=lbr, f="sigmoid",
                           g="tanh", out_dtype=out_dtype)


def _lstm(weights, act_name, I, H, where, out_dtype):
    _tanh_only(act_name, where, "LSTM always uses tanh for the candidate and the cell output")
    if len(weights) not in (2, 3):
        raise ValueError(
            f"{where}: expected weights [kernel, recurrent_kernel, bias], got {len(weights)} arrays"
        )
    kernel = _array(weights[0], (I, 4 * H), f"{where} kernel (weights[0])")
    recurrent = _array(weights[1], (H, 4 * H), f"{where} recurrent kernel (weights[1])")
    # No bias array: a Keras use_bias=False LSTM exported as is (zero bias).
    bias = _array(weights[2], (4 * H,), f"{where} bias (weights[2])") if len(weights) == 3 else None
    # Keras's gate blocks (i, f, c, o), which RTNeural reads, -> ours (i, o, f, c).
    return keras_lstm_layer(kernel, recurrent, bias, f="sigmoid", g="tanh", out_dtype=out_dtype)


def _dense(weights, act_name, n_in, n_out, where, out_dtype):
    act = _activation(act_name, where)
    if len(weights) not in (1, 2):
        raise ValueError(f"{where}: expected weights [kernel, bias], got {len(weights)} arrays")
    kernel = _array(weights[0], (n_in, n_out), f"{where} kernel (weights[0])")
    b = None
    if len(weights) == 2:
        b = _array(weights[1], (n_out,), f"{where} bias (weights[1])")
    return keras_dense_layer(kernel, b, act, out_dtype)


def _activation(name, where):
    name = "" if name is None else name
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"{where}: activation {name!r} is not one RTNeural defines; expected one of "
            f"{sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name]


def _size(shape, what):
    if not isinstance(shape, list) or not shape:
        raise ValueError(f"{what}: expected a non-empty list ending in a size, got {shape!r}")
    if len(shape) == 4:
        raise UnsupportedModelError(f"{what}: a 4-d (conv2d) shape {shape}; expected a sequence")
    n = shape[-1]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what}: expected a positive int as the last entry, got {shape!r}")
    return n


def _array(value, shape, what):
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: expected a nested list of numbers, got {exc}") from None
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{what}: expected shape {tuple(shape)}, got {arr.shape}")
    return arr

