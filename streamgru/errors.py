"""Exception types shared by the engine, the file formats and the converters."""

__all__ = ["UnsupportedModelError", "FormatError"]


class UnsupportedModelError(ValueError):
    """A model uses a feature streamgru does not run (bidirectional, an unknown activation, a graph
    that does not map onto a layer stack). The message names the node or layer and the reason."""


class FormatError(ValueError):
    """A file is not a valid streamgru file of a version we can read (wrong magic, unknown version,
    truncated, checksum mismatch, or saved for a different model)."""
