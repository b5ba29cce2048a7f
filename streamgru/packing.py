"""Fixed weights in the form the kernels read: one flat parameter buffer plus a layer table.

Packing happens once per engine. The buffers are read-only afterwards; see the module docstring
of :mod:`streamgru.kernels` for the meaning of every column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels as K
from .activations import activation_id
from .model import GRULayer

_ALIGN = 16  # elements; 64 bytes for float32, so every weight block starts on a cache line


@dataclass(frozen=True)
class PackedModel:
    """The model's weights cast to one dtype and laid out for the kernels.

    Attributes
    ----------
    params : (P,) float32 or float64, read-only
    table : (L, kernels.NT) int64, read-only
    fp : (L, kernels.NF) float of the same dtype, read-only
    scratch_width : int
        Width of one scratch row (``kernels.scratch_layout``).
    """

    params: np.ndarray
    table: np.ndarray
    fp: np.ndarray
    scratch_width: int


def pack(model, dtype) -> PackedModel:
    dtype = np.dtype(dtype)
    blocks, table, fp = [], [], []
    off = 0

    def put(arr):
        nonlocal off
        a = np.ascontiguousarray(arr, dtype=dtype).ravel()
        start = off
        blocks.append((start, a))
        off = start + a.size
        off = -(-off // _ALIGN) * _ALIGN
        return start

    gi = 0
    for layer in model.layers:
        row = np.zeros(K.NT, np.int64)
        frow = np.zeros(K.NF, np.float64)
        row[K.T_IN] = layer.input_size
        row[K.T_OUT] = layer.output_size
        if isinstance(layer, GRULayer):
            row[K.T_KIND] = K.KIND_GRU
            row[K.T_W] = put(layer.W)
            row[K.T_R] = put(layer.R)
            row[K.T_BW] = put(layer.Wb)
            row[K.T_BR] = put(layer.Rb)
            row[K.T_F] = activation_id(layer.f[0])
            row[K.T_G] = activation_id(layer.g[0])
            row[K.T_LBR] = layer.linear_before_reset
            row[K.T_SOFF] = model.state_slices[gi].start
            frow[[K.F_FA, K.F_FB, K.F_GA, K.F_GB]] = [layer.f[1], layer.f[2], layer.g[1],
                                                      layer.g[2]]
            frow[K.F_CLIP] = 0.0 if layer.clip is None else layer.clip
            gi += 1
        else:
            row[K.T_KIND] = K.KIND_DENSE
            row[K.T_W] = put(layer.W)
            row[K.T_BW] = put(layer.b)
            row[K.T_F] = activation_id(layer.activation[0])
            frow[[K.F_FA, K.F_FB]] = [layer.activation[1], layer.activation[2]]
        table.append(row)
        fp.append(frow)
    params = np.zeros(max(off, 1), dtype)
    for start, a in blocks:
        params[start:start + a.size] = a
    table = np.array(table, np.int64)
    fp = np.array(fp, dtype)
    width = int(K.scratch_layout(table)[2])
    for arr in (params, table, fp):
        arr.setflags(write=False)
    return PackedModel(params, table, fp, width)
