"""Fixed weights in the form the kernels read: one flat parameter buffer plus a layer table.

Packing happens once per engine. The buffers are read-only afterwards; see the module docstring
of :mod:`streamgru.kernels` for the meaning of every column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels as K

_ALIGN = 16  # elements; 64 bytes for float32, so every weight block starts on a cache line


@dataclass(frozen=True)
class PackedModel:
    """The model's weights cast and laid out for the kernels.

    Two dtypes: ``weights_dtype`` is how the weights are stored (``params``), ``dtype`` the
    compute dtype (the engine's state, inputs, outputs and scratch, the accumulators, ``fp``);
    the compute dtype alone decides the float32 fast tanh. Only equal dtypes are supported for
    now (:func:`pack` refuses the rest); a narrower weight dtype needs only the tiles' converting
    load (``kernels._load_weights``).

    Attributes
    ----------
    params : (P,) weights_dtype, read-only
    table : (L, kernels.NT) int64, read-only
    fp : (L, kernels.NF) dtype, read-only
    scratch_width : int
        Width of one scratch row (``table[0, kernels.T_LW]``).
    tail : tuple of (int, ndarray, ndarray)
        ``(layer index, W (out, in), b (out,))`` in ``dtype``, read-only, for each Dense layer
        after the last GRU layer: the output of a held state (``Engine(missing="skip")``).
    """

    params: np.ndarray
    table: np.ndarray
    fp: np.ndarray
    scratch_width: int
    tail: tuple = ()
    dtype: np.dtype = np.dtype(np.float32)
    weights_dtype: np.dtype = np.dtype(np.float32)


class LayerRow:
    """One layer's row of the kernels' table, as its kind's ``pack`` method fills it.

    Attributes
    ----------
    layer : Layer
    row : (kernels.NT,) int64
        The table row; ``T_IN``, ``T_OUT`` and ``T_SOFF`` (the layer's first state column) are
        set, the kind sets the rest (``T_KIND`` first).
    fp : (kernels.NF,) float64
        Activation parameters and clip.
    """

    def __init__(self, layer, state_offset, put_product, put_vector, pad, need):
        self.layer = layer
        self.row = np.zeros(K.NT, np.int64)
        self.fp = np.zeros(K.NF, np.float64)
        self.row[K.T_IN] = layer.input_size
        self.row[K.T_OUT] = layer.output_size
        self.row[K.T_SOFF] = state_offset
        self._put_product, self._put_vector = put_product, put_vector
        self._pad, self._need = pad, need

    def product(self, column, W, b):
        """Store the product ``W (M, K) v + b`` as weight panels (``b`` None: no bias);
        ``column`` is its first table column (``T_W``, ``T_R`` or ``T_RN``), followed by its
        bias and panel-count columns."""
        self.row[column:column + 3] = self._put_product(W, b)

    def vector(self, column, v):
        """Store the 1-D ``v`` in ``params`` as it is (a cell's own per-layer values, such as
        the LSTM's peepholes) and its offset in ``column``."""
        self.row[column] = self._put_vector(v)

    def need(self, *, width=0, gates=0, hidden=0):
        """Scratch room the cell needs per row: ``width`` for the layer's output (regions A/B),
        ``gates`` for its input products (GX, GH), ``hidden`` for its own workspace (HH, T)."""
        for name, m in (("width", width), ("gates", gates), ("hidden", hidden)):
            self._need[name] = max(self._need[name], self._pad(m))


def _check_range(model, dtype):
    """Refuse a model with a weight beyond ``dtype``'s range: the cast would make it inf, and
    every output of the engine NaN (numpy only warns)."""
    big = float(np.finfo(dtype).max)
    for i, layer in enumerate(model.layers):
        for name, t in layer.tensors().items():
            top = float(np.abs(t).max()) if t.size else 0.0
            if top > big:
                raise ValueError(f"model: layer {i} ({layer.kind}) tensor {name} holds values beyond "
                                 f"{dtype.name}'s range (max |v| = {top:.3g}); use "
                                 f'dtype="float64"')


def pack(model, dtype, weights_dtype=None) -> PackedModel:
    """Cast and lay out ``model``'s weights for the kernels (see :mod:`streamgru.kernels`).

    Parameters
    ----------
    model : GRUModel
    dtype : str or numpy dtype
        The compute dtype, float32 or float64.
    weights_dtype : str or numpy dtype, optional
        How the weights are stored; default ``dtype``, and only that for now.

    Raises ValueError, naming the layer and tensor, if a weight does not fit in ``dtype``, and
    naming ``weights_dtype`` if it differs from ``dtype``.

    Examples
    --------
    >>> from streamgru import GRUModel
    >>> p = pack(GRUModel.random(3, 8), "float32")
    >>> p.params.dtype, p.table.shape[0], p.scratch_width > 0
    (dtype('float32'), 1, True)
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype: expected float32 or float64, got {dtype.name}")
    wdtype = dtype if weights_dtype is None else np.dtype(weights_dtype)
    if wdtype != dtype:
        raise ValueError(f"weights_dtype: expected the compute dtype {dtype.name} (weights stored "
                         f"in another dtype are not supported yet), got {wdtype.name}")
    _check_range(model, wdtype)
    nr = K.panel_width(dtype)
    blocks, table, fp = [], [], []
    off = 0

    def pad(m):
        return -(-m // nr) * nr

    def put(arr):
        nonlocal off
        a = np.ascontiguousarray(arr, dtype=wdtype).ravel()
        start = off
        blocks.append((start, a))
        off = start + a.size
        off = -(-off // _ALIGN) * _ALIGN
        return start

    def put_product(W, b):
        """W (M, K) as ceil(M/NR) panels of W[p*NR:(p+1)*NR].T (K, NR), zero-padded; b padded."""
        W = np.asarray(W, np.float64)
        M, Kd = W.shape
        Wp = np.zeros((pad(M), Kd))
        Wp[:M] = W
        panels = Wp.reshape(-1, nr, Kd).transpose(0, 2, 1)  # (P, K, NR)
        bp = np.zeros(pad(M))
        if b is not None:
            bp[:M] = b
        return put(panels), put(bp), pad(M) // nr

    need = {"width": model.input_size, "gates": 1, "hidden": 1}
    slices = iter(model.state_slices)
    for layer in model.layers:
        t = LayerRow(layer, next(slices).start if layer.state_size else 0, put_product, put,
                     pad, need)
        layer.pack(t)
        table.append(t.row)
        fp.append(t.fp)
    maxw, gmax, hmax = pad(need["width"]), need["gates"], need["hidden"]
    # Scratch row: [A: maxw | B: maxw | GX: gmax | GH: gmax | HH: hmax | T: hmax | BK: S];
    # products write whole panels, so every region a product writes is padded to NR. BK holds
    # the row's stream state from before the step, restored if the step would produce NaN/inf.
    layout = np.cumsum([0, maxw, maxw, gmax, gmax, hmax, hmax, model.state_size])
    params = np.zeros(max(off, 1), wdtype)
    for start, a in blocks:
        params[start:start + a.size] = a
    table = np.array(table, np.int64)
    table[:, K.T_LA:K.T_LW + 1] = layout
    fp = np.array(fp, dtype)
    width = int(layout[-1])
    last = max(i for i, layer in enumerate(model.layers) if layer.recurrent)
    tail = tuple((i, np.array(layer.W, dtype), np.array(layer.b, dtype))
                 for i, layer in enumerate(model.layers) if i > last)
    for arr in (params, table, fp) + tuple(a for _, W, b in tail for a in (W, b)):
        arr.setflags(write=False)
    return PackedModel(params, table, fp, width, tail, dtype, wdtype)
