"""One error shape for every route: ``{"status": "error", "error": ..., "code": ..., "field": ...}``.

``error`` is the message (the job-queue API's field), ``code`` a stable name for
programs, ``field`` the request field at fault when there is one.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from sfumato.errors import InvalidModelError, InvalidParameterError, SfumatoError
from sfumato.server.jobs.store import StoreUnavailableError


class ErrorBody(BaseModel):
    """The body of every error response."""

    status: str = "error"
    error: str
    code: str
    field: str | None = None


class ApiError(Exception):
    """An error answered with ``status_code`` and an :class:`ErrorBody`."""

    def __init__(self, status_code: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.code, self.message, self.field = status_code, code, message, field


def error_response(status_code: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    body = ErrorBody(error=message, code=code, field=field)
    return JSONResponse(body.model_dump(), status_code=status_code)


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entry listing a route's error codes."""
    text = {
        400: "Bad request",
        401: "Missing or wrong API key",
        404: "Not found",
        409: "The queue is full",
        413: "Request body too large",
        422: "Invalid field",
        429: "Too many requests",
        500: "Internal error",
        503: "The job store's database cannot be reached",
    }
    return {c: {"model": ErrorBody, "description": text.get(c, "Error")} for c in (401, 413, 422, 500, 503, *codes)}


def install(app: FastAPI) -> None:
    """Make every error, ours or the framework's, answer in the one shape."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.field)

    @app.exception_handler(InvalidParameterError)
    async def invalid_parameter(_request: Request, exc: InvalidParameterError) -> JSONResponse:
        return error_response(422, "invalid_parameter", str(exc), exc.field)

    @app.exception_handler(InvalidModelError)
    async def invalid_model(_request: Request, exc: InvalidModelError) -> JSONResponse:
        return error_response(422, "invalid_model", str(exc), "model")

    @app.exception_handler(StoreUnavailableError)
    async def store_unavailable(_request: Request, exc: StoreUnavailableError) -> JSONResponse:
        return error_response(503, "store_unavailable", str(exc))

    @app.exception_handler(SfumatoError)
    async def sfumato_error(_request: Request, exc: SfumatoError) -> JSONResponse:
        return error_response(500, "engine_error", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        return error_response(422, "invalid_parameter", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")
