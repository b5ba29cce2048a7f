"""Model import from PyTorch, ONNX, Keras and RTNeural into :class:`streamgru.GRUModel`.

Only this package imports torch / onnx / h5py, and only inside the functions that need them, so
``import converters`` is cheap and works without any framework installed.
"""
