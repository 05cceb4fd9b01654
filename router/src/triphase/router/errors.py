"""The router's small typed error family; each maps to an HTTP status and an OpenAI error body."""

from __future__ import annotations


class RouterError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"


class Overloaded(RouterError):
    status = 429
    type = "rate_limit_error"


class Unavailable(RouterError):
    status = 503
    type = "service_unavailable"


class RequestTimeout(RouterError):
    status = 408
    type = "invalid_request_error"


class PayloadTooLarge(RouterError):
    status = 413
    type = "invalid_request_error"


class Unauthorized(RouterError):
    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")
