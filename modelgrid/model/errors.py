"""Errors raised by the model library.

Both derive from ValueError: they describe bad input (a checkpoint, a layer range, a request that
does not fit), so services map them to INVALID_ARGUMENT / FAILED_PRECONDITION / RESOURCE_EXHAUSTED,
never to INTERNAL.
"""


class ModelFormatError(ValueError):
    """A model directory or checkpoint cannot be used as asked: the message names the problem."""


class CacheCapacityError(ValueError):
    """A session's KV cache would grow past the limit it was created with."""
