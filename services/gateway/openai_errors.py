"""Domain errors -> OpenAI's error shape: {"error": {"message", "type", "param", "code"}} and an HTTP status.

OpenAI's clients pick their exception class from the status (400 BadRequestError, 401
AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 413, 429 RateLimitError, 5xx
InternalServerError), so the status is what matters; type and code follow OpenAI's own values.
"""

from __future__ import annotations

from typing import Any

from modelgrid.errors import ModelGridError

# gRPC code name -> (HTTP status, OpenAI error type, OpenAI error code)
_BY_CODE: dict[str, tuple[int, str, str | None]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", None),
    "FAILED_PRECONDITION": (400, "invalid_request_error", None),
    "OUT_OF_RANGE": (400, "invalid_request_error", None),
    "UNAUTHENTICATED": (401, "invalid_request_error", "invalid_api_key"),
    "PERMISSION_DENIED": (403, "permission_error", None),
    "NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "ALREADY_EXISTS": (409, "invalid_request_error", None),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "CANCELLED": (499, "invalid_request_error", "cancelled"),
    "UNAVAILABLE": (503, "service_unavailable", "unavailable"),
    "ABORTED": (503, "service_unavailable", "unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout", "timeout"),
}
# HTTP statuses the framework itself answers (unknown route, wrong method, body too large, ...)
_BY_STATUS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def from_domain(err: ModelGridError) -> tuple[int, dict[str, Any]]:
    """The status and body for a domain error (anything unmapped is a 500 server_error)."""
    status, type_, code = _BY_CODE.get(err.code, (500, "server_error", None))
    return status, error_body(err.message, type_, None, code)


def from_status(status: int, message: str) -> dict[str, Any]:
    type_, code = _BY_STATUS.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    return error_body(message, type_, None, code)
