"""Fixed weights in the form the kernels read: a weight-panel buffer, a float side table and a
layer table.

Packing happens once per engine. The buffers are read-only afterwards; see the module docstring
of :mod:`streamgru.kernels` for the meaning of every column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import compact
from . import kernels as K

_ALIGN_BYTES = 64  # every weight block starts on a cache line


# Bytes every array the kernels stream through starts on: a cache line (and an AVX-512 vector).
# A 64-byte vector load that straddles two lines costs two; numpy's allocations start 16 or 32
# bytes past one, which made `run` 3-9% slower (benchmarks/RESULTS.md, "Alignment").
ALIGN = 64


def aligned_zeros(shape, dtype):
    """np.zeros(shape, dtype) whose data starts on an ALIGN-byte boundary (a C-contiguous view
    of a slightly larger byte buffer)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.zeros(n + ALIGN, np.uint8)
    start = -buf.ctypes.data % ALIGN
    return buf[start:start + n].view(dtype).reshape(shape)


@dataclass(frozen=True)
class PackedModel:
    """The model's weights cast and laid out for the kernels.

    Two dtypes: ``weights_dtype`` is how the weight matrices are stored (``params``), ``dtype``
    the compute dtype (the engine's state, inputs, outputs and scratch, the accumulators, and
    ``fp``: activation parameters, biases, int8 scales, peepholes); the compute dtype alone
    decides the float32 fast tanh. ``weights_dtype`` is the compute dtype, or float16 / int8
    with float32 arithmetic (:mod:`streamgru.compact`): the tiles convert each loaded vector
    (``kernels._load_weights``).

    Attributes
    ----------
    params : (P,) weights_dtype, read-only
        The weight panels (float16 weights as their bits: a uint16 array).
    table : (L, kernels.NT) int64, read-only
    fp : (L + E, kernels.NF) dtype, read-only
        Rows 0..L-1: each layer's activation parameters; then, addressed flat, the biases,
        int8 scales and peepholes.
    scratch_width : int
        Width of one scratch row (``table[0, kernels.T_LW]``).
    tail : tuple of (int, ndarray, ndarray)
        ``(layer index, W (out, in), b (out,))`` in ``dtype``, read-only, for each Dense layer
        after the last recurrent layer: the output of a held state (``Engine(missing="skip")``);
        W as the kernels use it (dequantized for compact weights).
    weights : str
        The weights' form: ``"float32"``, ``"float64"``, ``"float16"`` or ``"int8"``.
    kernels : kernels.KernelSet
        The kernels for this model's cell set (:func:`kernels.cells_of`): they compile only
        the cells and Dense activations its layers take.
    """

    params: np.ndarray
    table: np.ndarray
    fp: np.ndarray
    scratch_width: int
    tail: tuple = ()
    dtype: np.dtype = np.dtype(np.float32)
    weights_dtype: np.dtype = np.dtype(np.float32)
    weights: str = "float32"
    kernels: object = None


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
        """Store the product ``W (M, K) v + b`` (``b`` None: no bias) as weight panels in the
        engine's weights form; ``column`` is the first of its group of four table columns
        (``T_W``, ``T_R`` or ``T_RN``: panels, bias, panel count, int8 scales)."""
        self.row[column:column + 4] = self._put_product(W, b)

    def vector(self, column, v):
        """Store the 1-D ``v`` in the float side table as it is (a cell's own per-layer values,
        such as the LSTM's peepholes) and its flat offset in ``column``."""
        self.row[column] = self._put_vector(v)

    def need(self, *, width=0, gates=0, hidden=0):
        """Scratch room the cell needs per row: ``width`` for the layer's output (regions A/B),
        ``gates`` for its input products (GX, GH), ``hidden`` for its own workspace (HH, T)."""
        for name, m in (("width", width), ("gates", gates), ("hidden", hidden)):
            self._need[name] = max(self._need[name], self._pad(m))


def _check_range(model, dtype, weights):
    """Refuse a model with a weight beyond ``dtype``'s range (or, with float16 weights, a weight
    matrix beyond float16's): the cast would make it inf, and every output of the engine NaN
    (numpy only warns)."""
    big = float(np.finfo(dtype).max)
    for i, layer in enumerate(model.layers):
        for name, t in layer.tensors().items():
            top = float(np.abs(t).max()) if t.size else 0.0
            if top > big:
                raise ValueError(f"model: layer {i} ({layer.kind}) tensor {name} holds values beyond "
                                 f"{dtype.name}'s range (max |v| = {top:.3g}); use "
                                 f'dtype="float64"')
            if weights == "float16" and t.ndim == 2 and top > float(np.finfo(np.float16).max):
                raise ValueError(f'weights: expected weight matrices within float16\'s range '
                                 f"(|v| <= 65504) for weights=\"float16\", got layer {i} "
                                 f"({layer.kind}) tensor {name} with max |v| = {top:.3g}; use "
                                 f'weights="int8" or "float32"')


def weights_form(dtype, weights, stored_as=None):
    """The weights form of an engine of compute ``dtype`` (``Engine``, ``ShardedEngine`` and
    ``converters.verify`` resolve their ``weights=`` here): ``weights`` None is the model's own
    form, ``stored_as`` (a model loaded from a compact file) for a float32 engine, else the
    compute dtype's; ``"float16"``/``"int8"`` need float32 arithmetic; ``"float32"``/
    ``"float64"`` must be the compute dtype."""
    dtype = np.dtype(dtype)
    if weights is None:
        weights = stored_as if dtype == np.float32 else None
    if weights is None:
        return dtype.name
    if weights == "float64" and dtype == np.float64:
        return weights
    compact.weights_format(weights)
    if weights != "float32" and dtype != np.float32:
        raise ValueError(f'weights: expected "float64" (or None) for a float64 engine, got '
                         f'{weights!r}; compact weights run float32 arithmetic: use '
                         f'dtype="float32"')
    if weights == "float32" and dtype != np.float32:
        raise ValueError(f'weights: expected "float64" (or None) for a float64 engine, got '
                         f'{weights!r}')
    return weights


def pack(model, dtype, weights=None) -> PackedModel:
    """Cast and lay out ``model``'s weights for the kernels (see :mod:`streamgru.kernels`).

    Parameters
    ----------
    model : Model
    dtype : str or numpy dtype
        The compute dtype, float32 or float64.
    weights : {None, "float32", "float64", "float16", "int8"}
        How the weight matrices are stored: None (default) in the compute dtype; ``"float16"``
        or ``"int8"`` (float32 arithmetic only) as :mod:`streamgru.compact` defines them.
        Biases, peepholes and activation parameters stay in the compute dtype.

    Raises ValueError, naming the layer and tensor, if a weight does not fit in ``dtype`` (or
    float16), and naming ``weights`` for a form the compute dtype cannot take.

    Examples
    --------
    >>> from streamgru import Model
    >>> p = pack(Model.random(3, 8), "float32")
    >>> p.params.dtype, p.table.shape[0], p.scratch_width > 0
    (dtype('float32'), 1, True)
    >>> pack(Model.random(3, 8), "float32", weights="int8").params.dtype
    dtype('int8')
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype: expected float32 or float64, got {dtype.name}")
    form = weights_form(dtype, weights)
    wdtype = compact.WEIGHT_FORMATS.get(form, dtype)
    _check_range(model, dtype, form)
    nr = K.panel_width(dtype)
    L = len(model.layers)
    walign = _ALIGN_BYTES // wdtype.itemsize
    wblocks, fblocks = [], []
    woff = 0
    foff = L * K.NF  # the flat float area starts after the layers' rows

    def pad(m):
        return -(-m // nr) * nr

    def put_weights(a):
        nonlocal woff
        start = woff
        wblocks.append((start, a.ravel()))
        woff = -(-(start + a.size) // walign) * walign
        return start

    def put_vector(v):
        nonlocal foff
        v = np.asarray(v, np.float64).ravel()
        start = foff
        fblocks.append((start, v))
        foff = start + v.size
        return start

    def put_product(W, b):
        """W (M, K) as ceil(M/NR) panels of W[p*NR:(p+1)*NR].T (K, NR), zero-padded, in the
        weights form; its bias and (int8) scales padded to NR in the float area."""
        M, Kd = W.shape
        stored, scales = compact.quantize(W, form) if form in ("float16", "int8") \
            else (np.asarray(W, np.float64), None)
        Wp = np.zeros((pad(M), Kd), wdtype)
        Wp[:M] = stored
        panels = Wp.reshape(-1, nr, Kd).transpose(0, 2, 1)  # (P, K, NR)
        bp = np.zeros(pad(M))
        if b is not None:
            bp[:M] = b
        soff = -1
        if scales is not None:
            sp = np.zeros(pad(M))
            sp[:M] = scales
            soff = put_vector(sp)
        return put_weights(np.ascontiguousarray(panels)), put_vector(bp), pad(M) // nr, soff

    need = {"width": model.input_size, "gates": 1, "hidden": 1}
    table, fp_rows = [], []
    slices = iter(model.state_slices)
    for layer in model.layers:
        t = LayerRow(layer, next(slices).start if layer.state_size else 0, put_product,
                     put_vector, pad, need)
        layer.pack(t)
        table.append(t.row)
        fp_rows.append(t.fp)
    maxw, gmax, hmax = pad(need["width"]), need["gates"], need["hidden"]
    # Scratch row: [A: maxw | B: maxw | GX: gmax | GH: gmax | HH: hmax | T: hmax | BK: S];
    # products write whole panels, so every region a product writes is padded to NR. BK holds
    # the row's stream state from before the step, restored if the step would produce NaN/inf.
    layout = np.cumsum([0, maxw, maxw, gmax, gmax, hmax, hmax, model.state_size])
    layout[-1] = -(-layout[-1] * dtype.itemsize // ALIGN) * ALIGN // dtype.itemsize  # rows aligned
    params = aligned_zeros(max(woff, 1), wdtype)
    for start, a in wblocks:
        params[start:start + a.size] = a
    if wdtype == np.float16:  # Numba's CPU target has no float16 arrays: the kernels get the bits
        params = params.view(np.uint16)
    flat = np.zeros(-(-foff // K.NF) * K.NF)
    flat[:L * K.NF] = np.ravel(fp_rows)
    for start, v in fblocks:
        flat[start:start + v.size] = v
    fp = aligned_zeros((flat.size // K.NF, K.NF), dtype)
    fp.reshape(-1)[:] = flat
    table = np.array(table, np.int64)
    table[:, K.T_LA:K.T_LW + 1] = layout
    table[:, K.T_PATH] = [K.cell_path(table, fp, l, dtype == np.float32) for l in range(L)]
    width = int(layout[-1])
    last = max(i for i, layer in enumerate(model.layers) if layer.recurrent)

    def as_used(W):  # the tail's W as the kernels use it
        if form in ("float16", "int8"):
            W = compact.dequantize(*compact.quantize(W, form))
        return np.array(W, dtype)

    tail = tuple((i, as_used(layer.W), np.array(layer.b, dtype))
                 for i, layer in enumerate(model.layers) if i > last)
    for arr in (params, table, fp) + tuple(a for _, W, b in tail for a in (W, b)):
        arr.setflags(write=False)
    return PackedModel(params, table, fp, width, tail, dtype, wdtype, form,
                       K.kernels_for(K.cells_of(table, fp, dtype)))
