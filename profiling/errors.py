"""The one exception type for bad input: the CLI prints its message and exits non-zero."""


class SpeckvError(Exception):
    """User-facing error: bad arguments, missing or corrupt inputs, incompatible models."""
