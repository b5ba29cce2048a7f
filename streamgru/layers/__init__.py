"""Layer kinds: one module per kind, each a :class:`Layer` subclass registered by its ``kind``.

Adding a kind: a module here with the class (sizes, ``state_size``, tensors, config round trip,
work estimate, ``describe``; the canonical layout and equations in its docstring), imported
below so that it registers. See docs/architecture.md for the rest (kernels, oracle, converters).
"""

from .base import LAYER_KINDS, Layer, format_activation, layer_class
from .dense import DenseLayer
from .gru import GRULayer
from .lstm import LSTMLayer

__all__ = ["Layer", "LAYER_KINDS", "layer_class", "format_activation", "GRULayer", "LSTMLayer",
           "DenseLayer"]
