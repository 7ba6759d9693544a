"""Errors that carry a gRPC status code name, shared by services and the SDK (no grpc import here)."""

from __future__ import annotations


class ModelGridError(Exception):
    """Base error; `code` is the name of the gRPC status code it maps to."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ModelGridError):
    code = "INVALID_ARGUMENT"


class NotFound(ModelGridError):
    code = "NOT_FOUND"


class AlreadyExists(ModelGridError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ModelGridError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ModelGridError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ModelGridError):
    code = "UNAVAILABLE"


class Aborted(ModelGridError):
    code = "ABORTED"


class Unauthenticated(ModelGridError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ModelGridError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(ModelGridError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(ModelGridError):
    code = "CANCELLED"


BY_CODE: dict[str, type[ModelGridError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted, Unavailable,
        Aborted, Unauthenticated, PermissionDenied, DeadlineExceeded, Cancelled,
    )
}


def from_code(code_name: str, message: str) -> ModelGridError:
    """The error class for a status code name ("NOT_FOUND"), or the base class for anything else."""
    cls = BY_CODE.get(code_name)
    if cls is None:
        err = ModelGridError(message)
        err.code = code_name
        return err
    return cls(message)
