"""What the converters share: lazy framework imports, dtype handling, the layouts they map from.

Each change of layout is written once here, with its reason, and every converter (and the
exporters, which map the other way) calls it:

* PyTorch stacks GRU gate blocks as (r, z, n); the canonical order is ONNX's (z, r, n):
  :func:`swap_rz` swaps the first two blocks, and is its own inverse.
* Keras (and RTNeural, which writes Keras's layout) stores ``kernel`` (I, 3H) and
  ``recurrent_kernel`` (H, 3H) with gate blocks (z, r, h) along the columns, and Dense kernels
  as (in, out): a transpose and no reordering (:func:`keras_gru_layer`, :func:`keras_dense_layer`).
* LSTM gate blocks: PyTorch's (i, f, g, o) and Keras's (i, f, c, o) -> the canonical (i, o, f, c)
  (:func:`ifco_to_iofc`; Keras's transposes and single bias: :func:`keras_lstm_tensors`,
  :func:`keras_lstm_layer`).
* ONNX's RNN activation names and onnxruntime's reading of ``activation_alpha``/``_beta``
  (:data:`ONNX_RNN_ACTIVATIONS`).
"""

import importlib
from collections.abc import Mapping

import numpy as np

from streamgru.errors import UnsupportedModelError
from streamgru.model import DenseLayer, GRULayer, LSTMLayer

__all__ = ["require", "target_dtype", "cast", "cast_layer", "check_keys", "exported_kinds", "swap_rz",
           "keras_gru_layer", "keras_dense_layer", "ONNX_RNN_ACTIVATIONS", "UnsupportedModelError"]

# Canonical name -> (ONNX RNN activation name, takes alpha, takes beta, onnxruntime's default
# alpha, default beta) (onnxruntime's rnn_helpers.cc; its defaults for Affine, ScaledTanh and
# ThresholdedRelu are 0, not the ONNX operators'). "identity" is no RNN activation in ONNX: the
# exporter writes it as Affine(1, 0), which is the same function.
ONNX_RNN_ACTIVATIONS = {
    "relu": ("Relu", False, False, 0.0, 0.0),
    "tanh": ("Tanh", False, False, 0.0, 0.0),
    "sigmoid": ("Sigmoid", False, False, 0.0, 0.0),
    "affine": ("Affine", True, True, 0.0, 0.0),
    "leakyrelu": ("LeakyRelu", True, False, 0.01, 0.0),
    "thresholdedrelu": ("ThresholdedRelu", True, False, 0.0, 0.0),
    "scaledtanh": ("ScaledTanh", True, True, 0.0, 0.0),
    "hardsigmoid": ("HardSigmoid", True, True, 0.2, 0.5),
    "elu": ("Elu", True, False, 1.0, 0.0),
    "softsign": ("Softsign", False, False, 0.0, 0.0),
    "softplus": ("Softplus", False, False, 0.0, 0.0),
    "identity": ("Affine", True, True, 0.0, 0.0),
}


def require(module: str, extra: str):
    """Import an optional dependency, or raise ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is needed to read or check this model but is not installed; "
            f"install it with: pip install 'streamgru[{extra}]'"
        ) from exc


def target_dtype(dtype):
    """A converter's ``dtype=`` argument: None (keep the source's) or float32/float64."""
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected None, 'float32' or 'float64', got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype: expected None, 'float32' or 'float64', got {dtype!r}")
    return dt


def cast(arr, out_dtype):
    """``arr`` as a C-contiguous array of ``out_dtype`` (None: keep its dtype)."""
    return np.ascontiguousarray(arr, dtype=out_dtype)


def cast_layer(layer, dtype):
    """A copy of ``layer`` (any :class:`streamgru.Layer`) with every tensor in ``dtype``."""
    return layer.astype(dtype)


def check_keys(cfg, allowed, where, what="configuration keys"):
    """Refuse a layer description holding keys this converter does not implement: a key it
    skipped could change what the layer computes, so it is never ignored."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where}: expected a config dict, got {type(cfg).__name__}")
    extra = sorted(set(cfg) - allowed)
    if extra:
        raise UnsupportedModelError(
            f"{where}: {what} {extra} are not implemented by streamgru; refusing rather than "
            f"ignoring them"
        )


def exported_kinds(model, table, exporter):
    """Refuse a model holding a layer kind that ``table`` (kind -> its export) has no entry for,
    naming the layer, before anything is built."""
    for i, layer in enumerate(model.layers):
        if layer.kind not in table:
            raise UnsupportedModelError(f"model: layers[{i}] is a {layer.kind!r} layer, which "
                                        f"{exporter} does not export (it maps "
                                        f"{', '.join(map(repr, table))})")


def swap_rz(a):
    """Swap the first two gate blocks along axis 0: PyTorch's (r, z, n) <-> canonical (z, r, n).

    ``a``: (3*H, ...) weights or (3*H,) biases. Its own inverse, so the exporter uses it too.
    """
    H = a.shape[0] // 3
    return np.concatenate([a[H:2 * H], a[:H], a[2 * H:]], axis=0)


def keras_gru_layer(kernel, recurrent, Wb, Rb, *, linear_before_reset, f, g, out_dtype):
    """A GRULayer from Keras-layout tensors: ``kernel`` (I, 3H), ``recurrent`` (H, 3H).

    Keras's gate blocks (z, r, h) along the columns are our (3H, in) rows in the same order: a
    transpose and nothing else. ``Wb``/``Rb`` (3H,) or None; Keras ``reset_after=True`` is
    ``linear_before_reset=1`` with bias (2, 3H) = [Wb; Rb], ``reset_after=False`` is 0 with one
    bias Wb (the caller splits the bias, whose shape errors name its own source).
    """
    I, H = kernel.shape[0], recurrent.shape[0]
    return GRULayer(I, H, cast(kernel.T, out_dtype), cast(recurrent.T, out_dtype),
                    None if Wb is None else cast(Wb, out_dtype),
                    None if Rb is None else cast(Rb, out_dtype),
                    linear_before_reset=linear_before_reset, f=f, g=g)


def keras_dense_layer(kernel, b, activation, out_dtype):
    """A DenseLayer from a Keras-layout ``kernel`` (in, out): ours is PyTorch's (out, in)."""
    return DenseLayer(kernel.shape[0], kernel.shape[1], cast(kernel.T, out_dtype),
                      None if b is None else cast(b, out_dtype), activation)


# LSTM layouts (docs/lstm.md). Both reorders are pure numpy and build no layer, so the oracle
# tests check them against torch before any converter uses them.
__all__ += ["ifco_to_iofc", "iofc_to_ifco", "keras_lstm_tensors", "keras_lstm_layer"]


def ifco_to_iofc(a):
    """LSTM gate blocks along axis 0: PyTorch's (i, f, g, o) and Keras's (i, f, c, o) -> the
    canonical (i, o, f, c).

    Both frameworks put the output gate last and the cell candidate (torch's g, Keras's c) third;
    ONNX, and so the canonical layout, puts the output gate second. ``a``: (4*H, ...) weights or
    (4*H,) biases.
    """
    i, f, c, o = np.split(np.asarray(a), 4, axis=0)
    return np.concatenate([i, o, f, c], axis=0)


def iofc_to_ifco(a):
    """The inverse of :func:`ifco_to_iofc`: canonical (i, o, f, c) -> PyTorch/Keras (i, f, c, o)
    along axis 0, for the exporters."""
    i, o, f, c = np.split(np.asarray(a), 4, axis=0)
    return np.concatenate([i, f, c, o], axis=0)


def keras_lstm_tensors(kernel, recurrent, bias):
    """Canonical ``(W, R, Wb, Rb)`` from Keras ``LSTM`` tensors.

    Keras stores ``kernel`` (I, 4H) and ``recurrent_kernel`` (H, 4H) with the gate blocks
    (i, f, c, o) along the columns: transposed, they are PyTorch's layout, reordered by
    :func:`ifco_to_iofc`. Keras has one bias (4H,) (or None: ``use_bias=False``) added once,
    which is ``Wb``; ``Rb`` is zero.
    """
    kernel, recurrent = np.asarray(kernel), np.asarray(recurrent)
    W = np.ascontiguousarray(ifco_to_iofc(kernel.T))
    R = np.ascontiguousarray(ifco_to_iofc(recurrent.T))
    dt = np.result_type(kernel, recurrent)
    Wb = np.zeros(W.shape[0], dt) if bias is None else ifco_to_iofc(bias)
    return W, R, Wb, np.zeros(W.shape[0], dt)


def keras_lstm_layer(kernel, recurrent, bias, *, f, g, out_dtype):
    """An LSTMLayer from Keras-layout tensors (Keras's ``LSTM`` and RTNeural's ``lstm``).

    ``kernel`` (I, 4H), ``recurrent`` (H, 4H), ``bias`` (4H,) or None, reordered by
    :func:`keras_lstm_tensors`. Keras applies ``activation`` both to the cell candidate and to
    the cell output, so ``g`` is the layer's ``g`` and ``h``; ``f`` is its
    ``recurrent_activation``. No peepholes, no clip, no projection, ``input_forget=0``.
    """
    I, H = kernel.shape[0], recurrent.shape[0]
    W, R, Wb, Rb = keras_lstm_tensors(kernel, recurrent, bias)
    return LSTMLayer(I, H, cast(W, out_dtype), cast(R, out_dtype), cast(Wb, out_dtype),
                     cast(Rb, out_dtype), f=f, g=g, h=g)
