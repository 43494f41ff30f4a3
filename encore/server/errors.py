"""OpenAI error objects: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause becomes an :class:`APIError` with a status code; the app's
handlers turn it (and anything unexpected) into that JSON shape. Messages never echo more
than a short prefix of user input (:func:`snippet`).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A client-visible error with an HTTP status (and ``Retry-After`` for 429/503)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, _TYPES.get(self.status, "invalid_request_error"),
                          self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def snippet(value: Any, limit: int = 40) -> str:
    """A short, safe rendering of user input for error messages."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def install_handlers(app: FastAPI) -> None:
    """Map APIError, unknown routes and unexpected exceptions to OpenAI error objects."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, _: Exception) -> JSONResponse:
        return APIError(404, f"no route {request.url.path[:80]!r}").response()

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc: Exception) -> JSONResponse:
        # the router's exception carries the route's ``Allow`` header; RFC 9110 requires it
        headers = getattr(exc, "headers", None)
        return JSONResponse(error_body(f"method {request.method[:16]} not allowed here",
                                       "invalid_request_error", code="method_not_allowed"),
                            status_code=405, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body("internal server error", "internal_error"),
                            status_code=500)
