"""Compact weight storage: float16 and int8 forms of a weight matrix, and back.

The engine can keep a model's weight matrices compactly (``Engine(model, weights=...)``) while
its arithmetic, state and activations stay float32: the kernels convert each loaded vector of
weights to float32 in registers. Biases, peepholes and every other vector stay float32.

``"float16"``
    Each weight rounded to IEEE half precision (``W.astype(float16)``, round to nearest even).
    Values beyond float16's range (65504) are refused, never turned into inf.

``"int8"``
    Symmetric, one float32 scale per output row of each matrix (a row of ``W`` (out, in) is
    one output): ``q = round(W / s)`` in [-127, 127] with ``s = max|W[row]| / 127``, and
    ``W ~ q * s``. The kernels sum ``x * q`` over a row and multiply the sum by ``s`` once.

Both forms are **idempotent**: quantizing the dequantized matrix gives back exactly the same
``q`` and ``s`` (float16: the same halves). So a model saved compactly (``model.save(path,
weights="int8")``) and loaded again holds the dequantized float32 matrix, and an engine built
from it with the same ``weights`` packs exactly the stored values: the same bits as the engine
that wrote the file. For int8 this needs the scale to be a fixed point of
``s -> float32(float32(127 * s) / 127)`` (the scale the dequantized row's maximum gives back),
which :func:`int8_scales` ensures by iterating that map (one or two steps).
"""

from __future__ import annotations

import numpy as np

__all__ = ["WEIGHT_FORMATS", "weights_format", "quantize_int8", "dequantize_int8", "to_float16",
           "quantize", "dequantize", "stored_bytes"]

#: The weight storage formats, by name: the numpy dtype the kernels read the weights in.
WEIGHT_FORMATS = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                  "int8": np.dtype(np.int8)}

_F16_MAX = float(np.finfo(np.float16).max)


def weights_format(weights, name="weights"):
    """Validate a ``weights=`` argument: one of :data:`WEIGHT_FORMATS`, returned as its name.

    Examples
    --------
    >>> weights_format("int8")
    'int8'
    """
    if not isinstance(weights, str):
        raise TypeError(f"{name}: expected one of {', '.join(map(repr, WEIGHT_FORMATS))}, got "
                        f"{type(weights).__name__} {weights!r}")
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, WEIGHT_FORMATS))}, got "
                         f"{weights!r}")
    return weights


def int8_scales(W):
    """The per-row scales of ``W`` (M, K): float32 ``max|W[row]| / 127`` made a fixed point of
    dequantize-then-quantize (see the module docstring); 1 for an all-zero row."""
    m = np.abs(np.asarray(W, np.float32)).max(axis=1) if W.shape[1] else np.zeros(W.shape[0])
    m = np.asarray(m, np.float32)
    s = np.where(m > 0, m / np.float32(127), np.float32(1)).astype(np.float32)
    for _ in range(8):
        top = (np.float32(127) * s).astype(np.float32)
        nxt = np.where(m > 0, top / np.float32(127), np.float32(1)).astype(np.float32)
        if np.array_equal(nxt, s):
            return s
        s = nxt
    raise AssertionError("int8 scales did not settle")  # pragma: no cover - float32 arithmetic


def quantize_int8(W):
    """``(q, s)``: ``q`` (M, K) int8 in [-127, 127], ``s`` (M,) float32, with ``W ~ q * s[:, None]``.

    Examples
    --------
    >>> q, s = quantize_int8(np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]]))
    >>> q.tolist(), s.tolist()
    ([[127, -64, 32], [0, 0, 0]], [0.007874015718698502, 1.0])
    """
    W = np.asarray(W, np.float32)
    s = int8_scales(W)
    q = np.clip(np.rint(W / s[:, None]), -127, 127).astype(np.int8)
    return q, s


def dequantize_int8(q, s):
    """The float32 matrix ``q * s[:, None]`` that :func:`quantize_int8` maps back to ``(q, s)``."""
    return (q.astype(np.float32) * np.asarray(s, np.float32)[:, None]).astype(np.float32)


def to_float16(W, name="W"):
    """``W`` rounded to float16; a value beyond float16's range is a ValueError naming ``name``."""
    W = np.asarray(W)
    top = float(np.abs(W).max()) if W.size else 0.0
    if top > _F16_MAX:
        raise ValueError(f"{name}: expected values within float16's range (|v| <= 65504) for "
                         f'weights="float16", got max |v| = {top:.3g}; use weights="int8" or '
                         f'"float32"')
    return W.astype(np.float16)


def quantize(W, fmt, name="W"):
    """``W`` (M, K) in storage format ``fmt``: ``(stored, scales)``; scales is None except for
    int8."""
    if fmt == "int8":
        return quantize_int8(W)
    if fmt == "float16":
        return to_float16(W, name), None
    return np.asarray(W, np.float32), None


def dequantize(stored, scales):
    """The float32 matrix a stored form stands for (the inverse of :func:`quantize`, exactly)."""
    if scales is not None:
        return dequantize_int8(stored, scales)
    return np.asarray(stored, np.float32)


def stored_bytes(shape, fmt):
    """Bytes a weight matrix of ``shape`` (M, K) takes in format ``fmt`` (int8: its scales too)."""
    M, K = shape
    per = WEIGHT_FORMATS[fmt].itemsize
    return M * K * per + (4 * M if fmt == "int8" else 0)
