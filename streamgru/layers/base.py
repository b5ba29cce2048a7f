"""The layer protocol: what every layer kind tells the rest of streamgru, and the registry of kinds.

A layer kind is one subclass of :class:`Layer` with a class attribute ``kind`` (the name the
native file stores). Defining the class registers it in :data:`LAYER_KINDS`, the one place a kind
is named: the native file rebuilds layers through it, and the model, ``streamgru info``, casting
and the engine's work estimate read only the protocol below, never a kind's name.

=====================  ==========================================================================
member                 meaning
=====================  ==========================================================================
``kind``               class attribute: the name stored in the native file (``"gru"``)
``recurrent``          class attribute: True when the layer holds per-stream state
``input_size``         width of one step's input
``output_size``        width of one step's output
``state_size``         values of per-stream state it holds (0: stateless; GRU: H; LSTM: H_out + H)
``state_parts``        ``((name, width), ...)`` of that state in order (GRU: h; LSTM: h, then C);
                       the output is always the first ``output_size`` values
``tensors()``          ``{name: frozen array}`` in the kind's canonical layout
``config()``           JSON-ready description of everything else, ``"kind"`` included
``from_config(c, t)``  classmethod: the layer back from ``config()`` and ``tensors()``
``astype(dtype)``      a copy with every tensor in float32 or float64
``num_parameters``     number of stored values
``macs``               multiply-adds per row and step (the engine picks kernels by it)
``recurrent_macs``     the part of ``macs`` on the layer's own state, which a sequence cannot
                       batch over time steps (0 for a stateless layer)
``describe()``         one line for ``streamgru info``
``pack(row)``          fill its row of the kernels' table (a ``packing.LayerRow``): kernel kind,
                       products as weight panels, activations, scratch needs
``runnable``           class attribute: True when the kind has ``pack`` and a kernel cell (the
                       engine refuses a model holding any other kind)
=====================  ==========================================================================

How the float64 oracle steps a kind lives with the tests (``tests/oracle.py``): the oracle must
stay independent of the code it checks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Layer", "LAYER_KINDS", "layer_class", "format_activation"]

_FLOAT_DTYPES = (np.float32, np.float64)

#: kind name -> layer class, in registration order; filled by :meth:`Layer.__init_subclass__`.
LAYER_KINDS: dict[str, type] = {}


class Layer:
    """Base class of every layer kind; subclasses register themselves by their ``kind``.

    Subclasses set ``kind`` (and ``recurrent = True`` if they hold per-stream state) and
    implement the members of the table in :mod:`streamgru.layers.base`. ``class X(Layer,
    register=False)`` defines a kind without registering it (the native loader will refuse it).

    Examples
    --------
    >>> from streamgru.layers import LAYER_KINDS
    >>> sorted(LAYER_KINDS)
    ['dense', 'gru', 'lstm']
    >>> LAYER_KINDS["gru"].recurrent, LAYER_KINDS["dense"].recurrent
    (True, False)
    """

    kind: str = ""
    recurrent: bool = False
    state_size = 0

    def __init_subclass__(cls, register=True, **kwargs):
        super().__init_subclass__(**kwargs)
        if not register:
            return
        kind = cls.__dict__.get("kind")
        if not isinstance(kind, str) or not kind:
            raise TypeError(f"{cls.__name__}: expected a class attribute kind (a non-empty str), "
                            f"got {kind!r}")
        if kind in LAYER_KINDS and LAYER_KINDS[kind] is not cls:
            raise ValueError(f"{cls.__name__}: expected a new layer kind, got {kind!r}, already "
                             f"registered by {LAYER_KINDS[kind].__name__}")
        LAYER_KINDS[kind] = cls

    # The members every kind provides (documented in the module table).
    input_size: int
    output_size: int

    def tensors(self) -> dict:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg, tensors):
        raise NotImplementedError

    @property
    def macs(self) -> int:
        raise NotImplementedError

    @property
    def recurrent_macs(self) -> int:
        return 0

    @property
    def state_parts(self):
        """``((name, width), ...)``: the parts of the layer's per-stream state, in order (empty
        for a stateless layer; one ``h`` part by default)."""
        return (("h", self.state_size),) if self.state_size else ()

    def describe(self) -> str:
        raise NotImplementedError

    @property
    def num_parameters(self):
        return sum(int(t.size) for t in self.tensors().values())

    #: False for a kind the kernels cannot run yet (it does not override :meth:`pack`).
    runnable = False

    def pack(self, row):
        """Fill ``row`` (a :class:`streamgru.packing.LayerRow`) for the kernels. A kind the engine
        runs overrides this and sets ``runnable = True``; the engine refuses the others before
        packing."""
        raise NotImplementedError(f"{type(self).__name__}: the kernels do not run {self.kind!r} "
                                  f"layers yet")

    def astype(self, dtype):
        """A copy of the layer with every tensor in ``dtype`` (float32 or float64).

        Built through :meth:`from_config`, so the copy is validated like any new layer.

        Examples
        --------
        >>> import numpy as np
        >>> from streamgru import DenseLayer
        >>> DenseLayer(2, 1, np.ones((1, 2), np.float32)).astype("float64").W.dtype
        dtype('float64')
        """
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype: expected 'float32' or 'float64', got {dtype!r}") from None
        if dt.type not in _FLOAT_DTYPES:
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
        big = float(np.finfo(dt).max)
        for name, t in self.tensors().items():
            top = float(np.abs(t).max()) if t.size else 0.0
            if top > big:  # the cast would make it inf
                raise ValueError(f"{name}: expected values within {dt.name}'s range, got max "
                                 f"|v| = {top:.3g}; keep this layer in float64")
        return type(self).from_config(self.config(),
                                      {k: t.astype(dt) for k, t in self.tensors().items()})


def layer_class(kind):
    """The registered class of ``kind``.

    Raises
    ------
    ValueError
        ``kind`` is not registered; the message lists the known kinds.

    Examples
    --------
    >>> layer_class("dense").__name__
    'DenseLayer'
    """
    cls = LAYER_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"kind: expected one of {', '.join(map(repr, sorted(LAYER_KINDS)))}, got "
                         f"{kind!r}; a file written by a newer streamgru may use a layer kind "
                         f"this one does not know (upgrade streamgru)")
    return cls


def format_activation(spec):
    """``(name, alpha, beta)`` as ``streamgru info`` prints it: the name alone when both are 0.

    Examples
    --------
    >>> format_activation(("tanh", 0.0, 0.0)), format_activation(("leakyrelu", 0.1, 0.0))
    ('tanh', 'leakyrelu(alpha=0.1, beta=0)')
    """
    name, alpha, beta = spec
    return name if (alpha, beta) == (0.0, 0.0) else f"{name}(alpha={alpha:g}, beta={beta:g})"


def weight(value, name, shape):
    """Validate one weight tensor: a real float array of exactly ``shape``, all finite.

    Returns a frozen C-contiguous copy in float32 or float64 (float16 is widened to float32).
    """
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except Exception as exc:  # ragged nested lists and the like
            raise TypeError(f"{name}: expected a float array of shape {shape}, got {exc}") from None
        if arr.dtype.kind in "iu":
            # A nested list of Python ints is a plain literal, not a typed array: read it as float64.
            arr = arr.astype(np.float64)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.dtype.type not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a float32 or float64 array, got dtype {arr.dtype}"
            f"; convert it with .astype(np.float32)"
        )
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name}: expected finite values, got {arr[tuple(bad)]} at index {tuple(int(i) for i in bad)}"
        )
    out = np.array(arr, dtype=arr.dtype, order="C", copy=True)
    out.setflags(write=False)
    return out


def size(value, name):
    """A positive int argument (``bool`` refused), as a Python int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def flag(value, name):
    """A 0/1 switch (a bool or the int 0 or 1), as a Python int."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer))
                                               and value in (0, 1)):
        return int(value)
    raise ValueError(f"{name}: expected 0 or 1 (or a bool), got {value!r}")


def clip_value(clip):
    """ONNX's cell ``clip``: None (off) or a positive finite float."""
    if clip is None:
        return None
    if isinstance(clip, bool):
        raise TypeError(f"clip: expected a positive float or None, got {clip!r}")
    try:
        clip = float(clip)
    except (TypeError, ValueError):
        raise TypeError(f"clip: expected a positive float or None, got {clip!r}") from None
    if not (clip > 0 and np.isfinite(clip)):
        raise ValueError(f"clip: expected a positive finite float or None, got {clip!r}")
    return clip
