"""Exception types shared by the engine, the file formats and the converters."""

__all__ = ["UnsupportedModelError", "FormatError", "NonFiniteError"]


class UnsupportedModelError(ValueError):
    """A model uses a feature streamgru does not run (bidirectional, an unknown activation, a graph
    that does not map onto a layer stack). The message names the node or layer and the reason."""


class FormatError(ValueError):
    """A file is not a valid streamgru file of a version we can read (wrong magic, unknown version,
    truncated, checksum mismatch, or saved for a different model)."""


class NonFiniteError(ValueError):
    """A call was refused because an input row, or a state or output that the step would produce,
    holds NaN or infinity. Nothing was changed: no stream advanced, no key was opened.

    Attributes
    ----------
    keys : list
        The streams concerned, in batch order without repeats, so that a caller can drop their
        rows and call again with the others.
    """

    def __init__(self, message, keys=()):
        super().__init__(message)
        self.keys = list(keys)
