"""Exception handlers: every error the API returns is ``{"error": "<what is wrong>"}`` with a 4xx/5xx.

One format for every failure (also the Triton client's expectation), so clients never parse
FastAPI's ``{"detail": [...]}`` shapes. Engine exceptions map to statuses here, not in routes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    ImageTooLarge,
    InvalidInput,
    SnapshotIncompatible,
    SnapshotNotFound,
    StoreUnavailable,
    UnknownModel,
    UnknownRequestIds,
)

log = logging.getLogger(__name__)


class ApiError(StarletteHTTPException):
    """An HTTP error with a message; subclasses Starlette's so FastAPI re-raises it from body reading."""

    def __init__(self, status_code: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=message, headers=dict(headers) if headers else None)


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers) if headers else None)


def describe_validation_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """``field.path: message`` for each problem, joined; the leading ``body`` location is dropped."""
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        where = ".".join(loc)
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error")
            msg = f"malformed JSON: {detail}" if detail else "malformed JSON"
            where = ""
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def _is_malformed_json(errors: Iterable[Mapping[str, Any]]) -> bool:
    return any(e.get("type") == "json_invalid" for e in errors)


def bad_request_from(exc: ValidationError) -> ApiError:
    """A pydantic error from a body the route parsed itself: 400 for broken JSON, 422 for wrong fields."""
    errors = exc.errors()
    return ApiError(400 if _is_malformed_json(errors) else 422, describe_validation_errors(errors))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers mapping framework and engine exceptions to ``{"error": ...}`` bodies."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        status = 400 if _is_malformed_json(errors) else 422
        return error_response(status, describe_validation_errors(errors))

    @app.exception_handler(UnknownModel)
    async def unknown_model(request: Request, exc: UnknownModel) -> JSONResponse:
        return error_response(404, str(exc))

    @app.exception_handler(UnknownRequestIds)
    async def unknown_ids(request: Request, exc: UnknownRequestIds) -> JSONResponse:
        return error_response(404, f"unknown request ids (never served, already labelled or forgotten): {exc.ids}")

    @app.exception_handler(SnapshotNotFound)
    async def snapshot_missing(request: Request, exc: SnapshotNotFound) -> JSONResponse:
        model = request.path_params.get("name", "")
        return error_response(404, f"no snapshot named {exc.args[0]!r} for model {model!r}")

    @app.exception_handler(SnapshotIncompatible)
    async def snapshot_incompatible(request: Request, exc: SnapshotIncompatible) -> JSONResponse:
        return error_response(409, str(exc))

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return error_response(503, f"shared state store unavailable: {exc}", {"Retry-After": "1"})

    @app.exception_handler(InvalidInput)
    async def invalid_input(request: Request, exc: InvalidInput) -> JSONResponse:
        return error_response(413 if isinstance(exc, ImageTooLarge) else 400, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return internal_error_response(request.method, request.url.path, exc)


def internal_error_response(method: str, path: str, exc: Exception) -> JSONResponse:
    """500 naming only the exception's type (details go to the log, never to the client)."""
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}")
