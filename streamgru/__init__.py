"""streamgru: stateful multi-stream GRU inference on the CPU.

One call advances many independent streams by one time step; the engine keeps every stream's
hidden state between calls.

>>> import numpy as np, streamgru
>>> model = streamgru.Model.random(4, 16)
>>> engine = streamgru.Engine(model)
>>> engine.step(["sensor-1", "sensor-2"], np.zeros((2, 4), np.float32)).shape
(2, 16)
"""

from .errors import FormatError, NonFiniteError, UnsupportedModelError
from .layers import LAYER_KINDS, Layer
from .model import DenseLayer, GRULayer, GRUModel, LSTMLayer, Model

__version__ = "0.1.0"


def __getattr__(name):
    # Engine and load pull in numba; keep `import streamgru` light until they are used.
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "load":
        from .formats import load

        return load
    raise AttributeError(f"module 'streamgru' has no attribute {name!r}")


__all__ = ["Model", "GRUModel", "Layer", "LAYER_KINDS", "GRULayer", "LSTMLayer", "DenseLayer",
           "Engine", "load", "UnsupportedModelError", "FormatError", "NonFiniteError", "__version__"]
