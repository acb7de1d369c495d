"""Every API error is one JSON shape: ``{"error": <machine code>, "detail": <what to do>}``.

Status codes follow RFC 9110 §15: 400 for a request the client must fix, 401/403 for RFC 6750
bearer-token failures, 404 for an unknown resource, 409 when the hub cannot do it in its current
state, 503 when the database cannot be reached.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ihehub.bus.db import StoreUnavailable

log = logging.getLogger("ihehub.api")

# Machine codes for statuses raised by the framework itself (unknown path, wrong method, ...).
_CODES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(StarletteHTTPException):
    """An HTTP error with a machine ``error`` code and a human ``detail``."""

    def __init__(
        self, status_code: int, error: str, detail: Any, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=dict(headers) if headers else None)
        self.error = error


def error_response(
    status_code: int, error: str, detail: Any, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status_code, headers=headers)


def short(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of a database error without the SQL statement SQLAlchemy appends."""
    inner = getattr(exc, "orig", None) or exc
    text = f"{type(inner).__name__}: {inner}".splitlines()[0] if str(inner) else type(inner).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    status = getattr(exc, "status_code", 500)
    error = getattr(exc, "error", None) or _CODES.get(status, f"http_{status}")
    return error_response(status, error, getattr(exc, "detail", str(exc)), getattr(exc, "headers", None))


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    problems = []
    for item in exc.errors() if isinstance(exc, RequestValidationError) else ():
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body" or len(item["loc"]) == 1)
        msg = str(item.get("msg", "invalid"))
        problems.append(f"{where}: {msg}" if where else msg)
    return error_response(400, "invalid_request", "; ".join(problems) or "invalid request")


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("API: database unavailable: %s", short(exc))
    return error_response(503, "database_unavailable", f"the message store cannot be read: {short(exc)}",
                          {"Retry-After": "5"})


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("API: unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
    return error_response(500, "internal_error", f"{type(exc).__name__}; the hub log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(StoreUnavailable, _database_error)
    app.add_exception_handler(Exception, _unexpected)
