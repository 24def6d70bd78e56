"""Domain errors of the control plane and their one mapping to HTTP.

Services raise these; ``api.main`` turns each into ``{"error": code, "detail": message}``
with its status. Routers never build error responses themselves.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ApiError(Exception):
    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, detail: Any, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class Gone(ApiError):
    """The client's token was revoked or its run ended."""

    status = 410
    code = "gone"


class RequestTimeout(ApiError):
    """The client stopped sending its request's body (``FEDSRD_BODY_TIMEOUT_S``)."""

    status = 408
    code = "timeout"


class TooLarge(ApiError):
    status = 413
    code = "too_large"


class InvalidInput(ApiError):
    status = 422
    code = "invalid"


class TooManyRequests(ApiError):
    """The caller already has as many requests of this kind in progress as it may."""

    status = 429
    code = "too_many_requests"


class Unavailable(ApiError):
    status = 503
    code = "unavailable"
