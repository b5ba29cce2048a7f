"""Model import from PyTorch, ONNX, Keras and RTNeural into :class:`streamgru.GRUModel`, and export.

Only this package imports torch / onnx / h5py, and only inside the functions that need them, so
``import converters`` is cheap and works without any framework installed.

* :func:`from_torch` -- ``nn.GRU``/``nn.GRUCell``/``nn.LSTM``/``nn.LSTMCell``/modules, state_dicts,
  ``.pt``, ``.safetensors``
* :func:`from_onnx` -- ``GRU`` and ``LSTM`` nodes from torch's exporters, ``GRU`` nodes from tf2onnx
* :func:`from_keras` -- ``.keras`` and legacy ``.h5`` (h5py only, no TensorFlow)
* :func:`from_rtneural` -- RTNeural's JSON
* :func:`verify` -- run the source framework and the engine side by side, compare step by step
* :func:`to_onnx`, :func:`to_torch` -- the other way: one step for a batch, ``(x, state) -> (y,
  state_out)``, as an ONNX graph or a torch module
"""

# Importing the functions (not only the modules) keeps `converters.from_torch` the function:
# the submodule import would otherwise rebind the package attribute to the module.
from .from_keras import from_keras
from .from_onnx import from_onnx
from .from_rtneural import from_rtneural
from .from_torch import from_torch
from .to_onnx import to_onnx
from .to_torch import to_torch
from .verify import VerifyReport, verify

__all__ = ["from_torch", "from_onnx", "from_keras", "from_rtneural", "to_onnx", "to_torch", "verify",
           "VerifyReport"]
