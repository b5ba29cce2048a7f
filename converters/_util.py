"""Helpers shared by the converters: lazy imports of optional frameworks."""

import importlib

from streamgru.errors import UnsupportedModelError

__all__ = ["require", "target_dtype", "UnsupportedModelError"]


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
    import numpy as np

    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected None, 'float32' or 'float64', got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype: expected None, 'float32' or 'float64', got {dtype!r}")
    return dt
