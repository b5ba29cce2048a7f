"""Helpers shared by the converters: lazy imports of optional frameworks."""

import importlib

from streamgru.errors import UnsupportedModelError

__all__ = ["require", "UnsupportedModelError"]


def require(module: str, extra: str):
    """Import an optional dependency, or raise ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is needed to read or check this model but is not installed; "
            f"install it with: pip install 'streamgru[{extra}]'"
        ) from exc
